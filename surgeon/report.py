"""What a pruning run reports: allocation per layer and module type, per-shot losses, timings, memory.

A :class:`Report` is plain data (JSON round trip) so that a run can be inspected, compared and plotted
without the model.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "versions"]


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - a missing git is not an error worth failing a run for
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of everything that can change a result."""
    import numpy
    import torch
    import transformers

    from . import __version__
    from ._backend import backend_name

    return {
        "surgeon": __version__,
        "surgeon_git": _git_sha(),
        "backend": backend_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Report:
    """The record of one pruning run.

    ``modules`` has one entry per prunable linear (``params_before``/``params_after`` count weights,
    ``layer``, ``type`` such as ``mlp.down_proj``); ``shots`` one entry per shot of multi-shot methods
    (target, estimated loss increase, wall time, and perplexity when measured); ``phases`` wall time and
    peak memory per phase.
    """

    method: str
    config: dict[str, Any]
    model: str = ""
    family: str = ""
    device: str = ""
    seed: int = 0
    params_before: int = 0
    params_after: int = 0
    wall_s: float = 0.0
    peak_gpu_gb: float = 0.0
    peak_host_gb: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    shots: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of prunable linear weights removed (zeros in dense matrices count as removed)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def size(self) -> float:
        """Fraction of prunable linear weights that remain."""
        return 1.0 - self.sparsity

    def allocation(self, by: str = "layer") -> dict[Any, float]:
        """Remaining fraction per layer (``by="layer"``) or per module type (``by="type"``)."""
        before: dict[Any, int] = {}
        after: dict[Any, int] = {}
        for rec in self.modules.values():
            key = rec[by]
            before[key] = before.get(key, 0) + rec["params_before"]
            after[key] = after.get(key, 0) + rec["params_after"]
        return {k: after[k] / before[k] for k in sorted(before, key=str) if before[k]}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        d["allocation"] = {"layer": {str(k): v for k, v in self.allocation("layer").items()},
                           "type": self.allocation("type")}
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Report:
        d = json.loads(Path(path).read_text())
        for derived in ("sparsity", "allocation"):
            d.pop(derived, None)
        return cls(**d)
