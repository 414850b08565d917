"""Argument checks shared by the kernels and by ``surgeon._backend``.

Every check raises ``ValueError`` with the same message whichever implementation runs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

__all__ = [
    "MAX_SHOTS",
    "MAX_TOTAL_WEIGHT",
    "SCHEDULE_KINDS",
    "as_int",
    "check_names",
    "check_nm",
    "check_schedule",
    "check_weights",
    "nan_cost_message",
    "nan_score_message",
]

#: Largest total weight of a selection (every count and weight fits in an int64).
MAX_TOTAL_WEIGHT = 2**63 - 1
#: Most shots a schedule may have.
MAX_SHOTS = 1_000_000
#: Schedule shapes.
SCHEDULE_KINDS = ("linear", "cubic", "exponential")


def as_int(value: Any, what: str) -> int:
    """``value`` as a Python int (ints, NumPy integers, 0-d integer tensors; not bools or floats)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}") from None


def check_weights(n_arrays: int, weights: Sequence[Any] | None) -> list[int]:
    """One positive integer weight per array (ones when ``weights`` is None)."""
    if weights is None:
        return [1] * n_arrays
    if isinstance(weights, (str, bytes)):
        raise ValueError("weights must be a sequence of positive integers")
    try:
        weights = [as_int(w, "weights") for w in weights]
    except TypeError:
        raise ValueError("weights must be a sequence of positive integers") from None
    if len(weights) != n_arrays:
        raise ValueError(f"weights has {len(weights)} entries for {n_arrays} arrays")
    for i, w in enumerate(weights):
        if not 0 < w <= MAX_TOTAL_WEIGHT:
            raise ValueError(f"weights must be positive integers below 2**63, weights[{i}] is {w}")
    return weights


def check_total_weight(total: int) -> int:
    """``total`` unchanged, or an error when it is too large for the kernels."""
    if total > MAX_TOTAL_WEIGHT:
        raise ValueError(f"total weight {total} must be below 2**63")
    return total


def check_names(n_arrays: int, names: Sequence[Any] | None) -> list[str] | None:
    """Array names for error messages: one per array, or None."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise ValueError("names must be a sequence of strings, one per array")
    names = [str(n) for n in names]
    if len(names) != n_arrays:
        raise ValueError(f"names has {len(names)} entries for {n_arrays} arrays")
    return names


def nan_cost_message(index: int, names: Sequence[str] | None) -> str:
    """Message for a NaN in cost array ``index``."""
    if names is not None and index < len(names):
        return f"cost array {index} ('{names[index]}') contains NaN"
    return f"cost array {index} contains NaN"


def nan_score_message(row: int) -> str:
    """Message for a NaN in row ``row`` of an N:M score matrix."""
    return f"scores contain NaN in row {row}"


def check_nm(rows: int, cols: int, n: Any, m: Any) -> tuple[int, int]:
    """``(n, m)`` as ints, checking ``0 < n < m`` and that ``m`` divides the row length ``cols``."""
    n = as_int(n, "n")
    m = as_int(m, "m")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got n={n}, m={m}")
    if cols % m:
        raise ValueError(f"N:M needs m to divide the row length, got m={m} for rows of {cols}")
    return n, m


def check_schedule(final_sparsity: Any, shots: Any, kind: Any) -> tuple[float, int, str]:
    """``(final_sparsity, shots, kind)`` checked: ``0 <= final < 1``, ``1 <= shots <= 1e6``, a known kind."""
    try:
        f = float(final_sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"final_sparsity must be a number, got {final_sparsity!r}") from None
    if not (0.0 <= f < 1.0) or math.isnan(f):
        raise ValueError(f"final_sparsity must satisfy 0 <= final_sparsity < 1, got {f}")
    shots = as_int(shots, "shots")
    if not 1 <= shots <= MAX_SHOTS:
        raise ValueError(f"shots must be between 1 and {MAX_SHOTS}, got {shots}")
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} (expected 'linear', 'cubic' or 'exponential')")
    return f, shots, kind
