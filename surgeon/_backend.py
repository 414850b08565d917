"""Public entry points of the selection and scheduling kernels, and the choice of implementation.

Two implementations with identical results back every function here:

- ``rust``: the compiled extension ``surgeon._native`` (multi-threaded, GIL released). Inputs are
  brought to host float32 contiguous NumPy arrays first; contiguous CPU float32 tensors and arrays
  are passed without a copy.
- ``torch``: the twins in :mod:`surgeon.kernels`, computed on the inputs' own device.

The environment chooses, when this module is imported:

- ``SURGEON_BACKEND=auto|rust|torch`` (default ``auto``: ``rust`` when the extension imports, else
  ``torch``); ``rust`` without the extension is an ``ImportError``;
- ``SURGEON_REQUIRE_NATIVE=1`` turns a missing or broken extension into an ``ImportError``.

:func:`set_backend` changes the choice at run time; :func:`get_backend` returns either
implementation as an object with the same functions.

Conventions shared by both implementations:

- Costs are float32 (other real dtypes are converted; float64 costs may tie after rounding). An
  array of any shape counts as its row-major flattening: positions are flat indices.
- The global order of entries is (cost ascending, array index ascending, position ascending).
  ``-0.0`` and ``0.0`` are the same cost, so ties between them go by array index and position;
  ``-inf`` and ``+inf`` are ordinary costs; a NaN raises ``ValueError`` naming the array index (and
  its name when ``names=`` is given).
- Arguments are checked here, so both implementations raise the same ``ValueError`` messages.
- Results are Python floats and ints, lists of them, or NumPy arrays (int64 positions and counts,
  bool masks) from either implementation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import kernels as _twins
from .kernels._checks import (
    MAX_TOTAL_WEIGHT,
    as_int,
    check_names,
    check_nm,
    check_schedule,
    check_total_weight,
    check_weights,
)
from .kernels.schedule import count_of

__all__ = [
    "Backend",
    "available_backends",
    "backend_name",
    "cumulative_counts",
    "get_backend",
    "global_threshold",
    "native_available",
    "next_count",
    "nm_mask",
    "rank",
    "schedule",
    "select_smallest",
    "set_backend",
]

BACKEND_ENV = "SURGEON_BACKEND"
REQUIRE_NATIVE_ENV = "SURGEON_REQUIRE_NATIVE"
_NAMES = ("rust", "torch")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


try:
    from . import _native  # type: ignore[attr-defined]

    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as _exc:  # the extension is not built (or does not load)
    _native = None
    NATIVE_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
    if _truthy(os.environ.get(REQUIRE_NATIVE_ENV)):
        raise ImportError(
            f"{REQUIRE_NATIVE_ENV} is set but the native extension surgeon._native cannot be imported "
            f"({NATIVE_IMPORT_ERROR}); build it with `maturin develop --release` (or `pip install -e .`)"
        ) from _exc


def native_available() -> bool:
    """Whether the compiled extension ``surgeon._native`` imported."""
    return _native is not None


def available_backends() -> tuple[str, ...]:
    """Names of the implementations that can run here."""
    return _NAMES if native_available() else ("torch",)


# --------------------------------------------------------------------------------------------------
# Input handling


def _check_dtype(dtype: Any, what: str) -> None:
    if isinstance(dtype, torch.dtype):
        ok = not dtype.is_complex
    else:
        ok = np.dtype(dtype).kind in "fiub"
    if not ok:
        raise ValueError(f"{what} must hold real numbers, got dtype {dtype}")


def _as_array_like(a: Any, what: str) -> torch.Tensor | np.ndarray:
    if isinstance(a, torch.Tensor):
        _check_dtype(a.dtype, what)
        return a
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not an array: {exc}") from None
    _check_dtype(arr.dtype, what)
    return arr


def _cost_list(arrays: Any) -> list[torch.Tensor | np.ndarray]:
    if isinstance(arrays, (torch.Tensor, np.ndarray, str, bytes)):
        raise ValueError("arrays must be a sequence (list or tuple) of arrays or tensors, not a single array")
    try:
        items = list(arrays)
    except TypeError:
        raise ValueError("arrays must be a sequence (list or tuple) of arrays or tensors") from None
    return [_as_array_like(a, f"cost array {i}") for i, a in enumerate(items)]


def _numel(a: torch.Tensor | np.ndarray) -> int:
    return int(a.numel()) if isinstance(a, torch.Tensor) else int(a.size)


def _host_f32(a: torch.Tensor | np.ndarray, flat: bool = True) -> np.ndarray:
    """Host float32 C-contiguous NumPy view of ``a`` (a copy only where needed)."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.device.type != "cpu" or t.dtype != torch.float32:
            t = t.to(device="cpu", dtype=torch.float32)
        t = t.resolve_conj().resolve_neg()
        t = t.reshape(-1) if flat else t
        return t.contiguous().numpy()
    arr = np.ascontiguousarray(a, dtype=np.float32)
    return arr.reshape(-1) if flat else arr


def _device_f32(a: torch.Tensor | np.ndarray, flat: bool = True) -> torch.Tensor:
    """Float32 tensor of ``a`` on its own device (NumPy input: on the CPU, shared when possible)."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
    else:
        arr = np.ascontiguousarray(a, dtype=np.float32)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return t.reshape(-1) if flat else t


def _to_numpy(t: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=dtype)


def _budget(k: Any, fraction: Any, total: int) -> int:
    """The integer budget: ``k`` clamped to ``total``, or ``floor(fraction * total + 1e-9)``."""
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k and fraction")
    if fraction is not None:
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            raise ValueError(f"fraction must be a number, got {fraction!r}") from None
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction must satisfy 0 <= fraction <= 1, got {f}")
        return count_of(f, total)
    k = as_int(k, "k")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return min(k, total)


class _Prepared:
    """Checked arguments of a selection call."""

    def __init__(self, arrays: Any, k: Any, weights: Any, fraction: Any, names: Any) -> None:
        self.arrays = _cost_list(arrays)
        self.weights = check_weights(len(self.arrays), weights)
        self.names = check_names(len(self.arrays), names)
        total = check_total_weight(sum(_numel(a) * w for a, w in zip(self.arrays, self.weights)))
        self.k = _budget(k, fraction, total)


def _check_total(total: Any) -> int:
    total = as_int(total, "total")
    if not 0 <= total <= MAX_TOTAL_WEIGHT:
        raise ValueError(f"total must satisfy 0 <= total < 2**63, got {total}")
    return total


def _check_next(removed_so_far: Any, shot: Any, shots: int) -> tuple[int, int]:
    removed_so_far = as_int(removed_so_far, "removed_so_far")
    if removed_so_far < 0:
        raise ValueError(f"removed_so_far must be >= 0, got {removed_so_far}")
    shot = as_int(shot, "shot")
    if not 0 <= shot < shots:
        raise ValueError(f"shot must satisfy 0 <= shot < shots ({shots}), got {shot}")
    return min(removed_so_far, MAX_TOTAL_WEIGHT), shot


def _scores_2d(scores: Any) -> torch.Tensor | np.ndarray:
    s = _as_array_like(scores, "scores")
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(s.shape)}")
    return s


# --------------------------------------------------------------------------------------------------
# Implementations


class Backend:
    """One implementation (``"rust"`` or ``"torch"``) behind the public functions of this module."""

    def __init__(self, name: str) -> None:
        if name not in _NAMES:
            raise ValueError(f"unknown backend {name!r} (expected 'rust' or 'torch')")
        if name == "rust" and _native is None:
            raise ImportError(f"the rust backend needs surgeon._native, which cannot be imported ({NATIVE_IMPORT_ERROR})")
        self.name = name

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def global_threshold(
        self,
        arrays: Sequence[Any],
        k: int | None = None,
        weights: Sequence[int] | None = None,
        *,
        fraction: float | None = None,
        names: Sequence[str] | None = None,
    ) -> tuple[float, list[int]]:
        """Threshold of the cheapest prefix of the global order that fits budget ``k``.

        Every entry of ``arrays[i]`` weighs ``weights[i]`` (positive integers, 1 by default); the
        longest prefix of the global order (cost, array index, position) whose total weight is at
        most ``k`` is selected. ``fraction`` instead of ``k`` sets ``k = floor(fraction * total
        weight + 1e-9)``; ``k`` above the total weight selects everything. Returns ``(threshold,
        counts)``: the cost of the last selected entry, ``-inf`` when nothing is selected (``counts``
        tells that apart from a prefix of ``-inf`` costs), and the number selected per array.
        """
        threshold, counts = self._over_arrays("global_threshold", _Prepared(arrays, k, weights, fraction, names))
        return float(threshold), [int(c) for c in counts]

    def select_smallest(
        self,
        arrays: Sequence[Any],
        k: int | None = None,
        weights: Sequence[int] | None = None,
        *,
        fraction: float | None = None,
        names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Positions selected by :meth:`global_threshold`'s rule: one int64 array per input array,
        flat positions in ascending order."""
        chosen = self._over_arrays("select_smallest", _Prepared(arrays, k, weights, fraction, names))
        return [_to_numpy(c, np.int64) for c in chosen]

    def _over_arrays(self, fn: str, p: _Prepared) -> Any:
        """Call ``fn`` of the native module on host float32 arrays, or of the twins on device tensors."""
        if self.name == "rust":
            return getattr(_native, fn)([_host_f32(a) for a in p.arrays], p.k, p.weights, p.names)
        return getattr(_twins, fn)([_device_f32(a) for a in p.arrays], p.k, p.weights, p.names)

    def rank(self, costs: Any, k: int) -> np.ndarray:
        """Flat positions of the ``min(k, size)`` cheapest entries of ``costs``, ordered by cost then
        position (int64)."""
        a = _as_array_like(costs, "costs")
        k = _budget(k, None, _numel(a))
        if self.name == "rust":
            out = _native.rank(_host_f32(a), k)
        else:
            out = _twins.rank(_device_f32(a), k)
        return _to_numpy(out, np.int64)

    def nm_mask(self, scores: Any, n: int, m: int) -> np.ndarray:
        """N:M keep-mask of a 2-D score matrix (bool, ``True`` = keep, same shape): in every group
        of ``m`` consecutive entries of a row the ``n`` highest scores are kept, ties keep the lower
        position. Needs ``0 < n < m`` and ``m`` dividing the row length; NaN is an error."""
        s = _scores_2d(scores)
        rows, cols = (int(d) for d in s.shape)
        n, m = check_nm(rows, cols, n, m)
        if self.name == "rust":
            out = _native.nm_mask(_host_f32(s, flat=False), n, m)
        else:
            out = _twins.nm_mask(_device_f32(s, flat=False), n, m)
        return _to_numpy(out, np.bool_)

    def schedule(self, final_sparsity: float, shots: int, kind: str = "linear") -> list[float]:
        """Target sparsity after each shot, non-decreasing, exactly ``final_sparsity`` at the last.

        With ``u = t / shots`` for shot ``t = 1..shots``: ``linear`` ``s = f*u`` (density linear
        from 1 to ``1-f``), ``cubic`` ``s = f*(1-(1-u)**3)`` (gradual pruning), ``exponential``
        ``s = 1-(1-f)**u`` (density geometric). Needs ``0 <= f < 1`` and ``1 <= shots <= 1e6``.
        """
        f, shots, kind = check_schedule(final_sparsity, shots, kind)
        if self.name == "rust":
            out = _native.schedule(f, shots, kind)
        else:
            out = _twins.schedule(f, shots, kind)
        return [float(s) for s in out]

    def cumulative_counts(self, total: int, final_sparsity: float, shots: int, kind: str = "linear") -> np.ndarray:
        """Units of ``total`` removed after each shot (int64): ``floor(s_t*total + 1e-9)`` capped at
        the final count ``floor(final_sparsity*total + 1e-9)``, non-decreasing, exactly the final
        count at the last shot."""
        f, shots, kind = check_schedule(final_sparsity, shots, kind)
        total = _check_total(total)
        if self.name == "rust":
            out = _native.cumulative_counts(total, f, shots, kind)
        else:
            out = _twins.cumulative_counts(total, f, shots, kind)
        return _to_numpy(out, np.int64)

    def next_count(
        self, removed_so_far: int, shot: int, total: int, final_sparsity: float, shots: int, kind: str = "linear"
    ) -> int:
        """Units to remove in shot ``shot`` (0-based) after ``removed_so_far``: that shot's
        cumulative count minus what is already removed, never negative."""
        f, shots, kind = check_schedule(final_sparsity, shots, kind)
        total = _check_total(total)
        removed_so_far, shot = _check_next(removed_so_far, shot, shots)
        if self.name == "rust":
            return int(_native.next_count(removed_so_far, shot, total, f, shots, kind))
        return int(_twins.next_count(removed_so_far, shot, total, f, shots, kind))


def _from_environment() -> Backend:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", *_NAMES):
        raise ImportError(f"{BACKEND_ENV} must be 'auto', 'rust' or 'torch', got {choice!r}")
    if choice == "auto":
        choice = "rust" if native_available() else "torch"
    return Backend(choice)


_current = _from_environment()
_instances: dict[str, Backend] = {_current.name: _current}


def get_backend(name: str | None = None) -> Backend:
    """The implementation ``name`` (``"rust"`` or ``"torch"``), or the current one."""
    if name is None:
        return _current
    if name not in _instances:
        _instances[name] = Backend(name)
    return _instances[name]


def set_backend(name: str) -> None:
    """Makes ``name`` (``"rust"`` or ``"torch"``) the implementation of the module functions."""
    global _current
    _current = get_backend(name)


def backend_name() -> str:
    """Name of the implementation the module functions use: ``"rust"`` or ``"torch"``."""
    return _current.name


# --------------------------------------------------------------------------------------------------
# Module-level functions: the current implementation


def global_threshold(
    arrays: Sequence[Any],
    k: int | None = None,
    weights: Sequence[int] | None = None,
    *,
    fraction: float | None = None,
    names: Sequence[str] | None = None,
) -> tuple[float, list[int]]:
    return _current.global_threshold(arrays, k, weights, fraction=fraction, names=names)


def select_smallest(
    arrays: Sequence[Any],
    k: int | None = None,
    weights: Sequence[int] | None = None,
    *,
    fraction: float | None = None,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    return _current.select_smallest(arrays, k, weights, fraction=fraction, names=names)


def rank(costs: Any, k: int) -> np.ndarray:
    return _current.rank(costs, k)


def nm_mask(scores: Any, n: int, m: int) -> np.ndarray:
    return _current.nm_mask(scores, n, m)


def schedule(final_sparsity: float, shots: int, kind: str = "linear") -> list[float]:
    return _current.schedule(final_sparsity, shots, kind)


def cumulative_counts(total: int, final_sparsity: float, shots: int, kind: str = "linear") -> np.ndarray:
    return _current.cumulative_counts(total, final_sparsity, shots, kind)


def next_count(
    removed_so_far: int, shot: int, total: int, final_sparsity: float, shots: int, kind: str = "linear"
) -> int:
    return _current.next_count(removed_so_far, shot, total, final_sparsity, shots, kind)


for _name in ("global_threshold", "select_smallest", "rank", "nm_mask", "schedule", "cumulative_counts", "next_count"):
    globals()[_name].__doc__ = getattr(Backend, _name).__doc__
del _name
