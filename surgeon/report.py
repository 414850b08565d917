"""What a pruning run reports: allocation per layer and module type, per-shot losses, timings, memory.

A :class:`Report` is plain data (JSON round trip) so that a run can be inspected, compared and plotted
without the model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CORE_PATHS", "NOT_CORE", "Report", "core_digest", "core_pathspec", "git_commit", "versions"]

_ROOT = Path(__file__).resolve().parent.parent

#: What decides the numbers a run reports: every file below these folders of the checkout ...
CORE_PATHS = ("surgeon", "rust")
#: ... except these (globs relative to the checkout), which only present, store, plan or export a run,
#: or are prose. A results JSON made at a commit whose core differs from HEAD's is stale.
NOT_CORE = (
    "surgeon/__main__.py", "surgeon/cli.py", "surgeon/report.py", "surgeon/plot.py", "surgeon/checkpoint.py",
    "surgeon/io.py", "surgeon/memory.py", "surgeon/export*", "surgeon/export*/**", "surgeon/_native.pyi",
    "surgeon/py.typed", "surgeon/corpora/pydoc/LICENSE-PSF.txt", "**/*.md",
)
#: Build outputs and caches inside the core folders, never part of it.
_NOT_SOURCE = ("*/__pycache__/*", "*.pyc", "*.so", "*.pyd", "rust/target/*")

#: When git cannot tell (a copy of the tree without .git), the commit it was copied from, if the
#: person running it says so; the core digest still records what the code was.
GIT_ENV = "SURGEON_GIT_SHA"


def core_pathspec() -> list[str]:
    """:data:`CORE_PATHS` less :data:`NOT_CORE` as git pathspecs (for ``git diff``/``git status``)."""
    return [*CORE_PATHS, *(f":(exclude,glob){p}" for p in NOT_CORE)]


def _is_core(rel: str) -> bool:
    return not any(fnmatch.fnmatch(rel, p) for p in NOT_CORE + _NOT_SOURCE)


def core_digest(root: str | os.PathLike | None = None) -> str:
    """sha256 over the path and content of every core file below ``root`` (the checkout), as the files
    are on disk: the same code gives the same digest with or without git, committed or not."""
    root = Path(root) if root is not None else _ROOT
    h = hashlib.sha256()
    files = sorted(p for top in CORE_PATHS if (root / top).is_dir() for p in (root / top).rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix()
        if _is_core(rel):
            h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(root: str | os.PathLike | None = None) -> str:
    """The checkout's commit (short sha), with ``+dirty`` when a core file differs from it (modified,
    staged, deleted or untracked); ``$SURGEON_GIT_SHA`` or ``unknown`` when ``root`` is no git checkout
    of its own (an installed package inside some other repository does not count)."""
    root = Path(root).resolve() if root is not None else _ROOT
    top = _git(root, "rev-parse", "--show-toplevel")
    sha = _git(root, "rev-parse", "--short", "HEAD")
    if top is None or sha is None or Path(top.strip()).resolve() != root:
        return os.environ.get(GIT_ENV) or "unknown"
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *core_pathspec())
    return sha.strip() + ("+dirty" if status is None or status.strip() else "")


def versions() -> dict[str, str]:
    """Versions of everything that can change a result; ``surgeon_git`` and ``surgeon_core`` say
    which code it was (see :func:`git_commit`, :func:`core_digest`)."""
    import numpy
    import torch
    import transformers

    from . import __version__
    from ._backend import backend_name

    return {
        "surgeon": __version__,
        "surgeon_git": git_commit(),
        "surgeon_core": core_digest(),
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
