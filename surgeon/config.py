"""Configuration shared by every method: frozen dataclasses with validation and a JSON round trip.

Each method defines its own config as a subclass of :class:`MethodConfig` (in its module under
``surgeon.methods``) and registers it by name; the CLI builds its options from the fields, using the
``help`` entry of each field's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["MethodConfig", "option", "parse_structure"]

CONFIG_VERSION = 1


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by the CLI and in the docs)."""
    return field(default=default, metadata={"help": help, **kwargs})


def parse_structure(structure: str) -> tuple[str, int, int]:
    """``"structured"``, ``"unstructured"`` or ``"N:M"`` → (kind, n, m); n = m = 0 unless kind is ``"nm"``."""
    if structure in ("structured", "unstructured"):
        return structure, 0, 0
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if not m:
        raise ValueError(f"structure must be 'structured', 'unstructured' or 'N:M' (e.g. '2:4'), got {structure!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"N:M needs 0 < N < M, got {structure!r}")
    return "nm", n, mm


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method has. ``sparsity`` is the fraction of prunable linear weights removed.

    For structured pruning the remaining *size* is ``1 - sparsity`` (so "structured 80%" is
    ``sparsity=0.2``). For N:M structures the sparsity is implied (``1 - N/M``) and may be left at 0.
    """

    method: ClassVar[str] = ""
    structures: ClassVar[tuple[str, ...]] = ("structured", "unstructured", "nm")

    sparsity: float = option(0.5, "fraction of prunable linear weights to remove (structured: 1 - remaining size)")
    structure: str = option("unstructured", "'structured', 'unstructured' or 'N:M' such as '2:4'")
    seed: int = option(0, "random seed (calibration sampling, sampled Fisher labels)")

    def __post_init__(self) -> None:
        kind, n, m = parse_structure(self.structure)
        if kind not in self.structures:
            raise ValueError(f"{self.method or type(self).__name__} does not support structure {self.structure!r}")
        if kind == "nm":
            implied = 1.0 - n / m
            if self.sparsity not in (0.0, implied) and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"structure {self.structure} implies sparsity {implied:g}, got {self.sparsity:g}")
            object.__setattr__(self, "sparsity", implied)
        elif not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity!r}")

    @property
    def structure_kind(self) -> str:
        return parse_structure(self.structure)[0]

    @property
    def nm(self) -> tuple[int, int]:
        _, n, m = parse_structure(self.structure)
        return n, m

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        d = dict(d)
        d.pop("version", None)
        name = d.pop("method", cls.method)
        if cls.method and name != cls.method:
            raise ValueError(f"config is for method {name!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)
