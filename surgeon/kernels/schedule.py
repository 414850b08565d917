"""Twins of the native multi-shot schedules (plain Python arithmetic, bit-identical to Rust).

With ``T`` shots, final sparsity ``f`` (``0 <= f < 1``) and ``u = t / T`` for shot ``t = 1..T``:

- ``linear``: density falls linearly from 1 to ``1 - f``: ``s_t = f * u``;
- ``cubic``: gradual pruning, fast first and slow last: ``s_t = f * (1 - (1 - u) ** 3)``;
- ``exponential``: density is geometric from 1 to ``1 - f``: ``s_t = 1 - (1 - f) ** u``.

The last target is exactly ``f``; targets are clamped to be non-decreasing and at most ``f``.
A sparsity ``s`` of ``total`` units removes ``floor(s * total + 1e-9)`` of them (the epsilon keeps
``0.3 * 10 = 2.9999999999999996`` from losing a unit), capped at ``total``. Cumulative counts per
shot are capped at the final count ``floor(f * total + 1e-9)``, non-decreasing, and exactly the final
count at the last shot.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_int, check_schedule

__all__ = ["COUNT_EPSILON", "count_of", "cumulative_counts", "next_count", "schedule"]

#: Added to ``sparsity * total`` before rounding down to a count of units.
COUNT_EPSILON = 1e-9


def _raw_target(kind: str, f: float, t: int, shots: int) -> float:
    if t == shots:
        return f
    u = t / shots
    if kind == "linear":
        return f * u
    if kind == "cubic":
        v = 1.0 - u
        return f * (1.0 - v * v * v)
    return 1.0 - math.pow(1.0 - f, u)


def schedule(final_sparsity: float, shots: int, kind: str) -> list[float]:
    """Target sparsity after each of the ``shots`` shots."""
    f, shots, kind = check_schedule(final_sparsity, shots, kind)
    out: list[float] = []
    previous = 0.0
    for t in range(1, shots + 1):
        s = min(max(_raw_target(kind, f, t, shots), previous), f)
        out.append(s)
        previous = s
    return out


def count_of(fraction: float, total: int) -> int:
    """Units of ``total`` that a sparsity ``fraction`` removes: ``min(total, floor(fraction*total + 1e-9))``."""
    c = math.floor(fraction * float(total) + COUNT_EPSILON)
    return 0 if c <= 0 else min(int(c), total)


def _check_total(total: int) -> int:
    total = as_int(total, "total")
    if not 0 <= total < 2**63:
        raise ValueError(f"total must satisfy 0 <= total < 2**63, got {total}")
    return total


def _counts(total: int, final_sparsity: float, shots: int, kind: str) -> list[int]:
    total = _check_total(total)
    targets = schedule(final_sparsity, shots, kind)
    last = count_of(float(final_sparsity), total)
    out: list[int] = []
    previous = 0
    for t, s in enumerate(targets):
        c = last if t + 1 == len(targets) else max(min(count_of(s, total), last), previous)
        out.append(c)
        previous = c
    return out


def cumulative_counts(total: int, final_sparsity: float, shots: int, kind: str) -> torch.Tensor:
    """Units of ``total`` removed after each shot (int64, CPU)."""
    return torch.tensor(_counts(total, final_sparsity, shots, kind), dtype=torch.int64)


def next_count(removed_so_far: int, shot: int, total: int, final_sparsity: float, shots: int, kind: str) -> int:
    """Units to remove in shot ``shot`` (0-based) given ``removed_so_far``: the shot's cumulative
    count minus what is already removed, never negative (so never above the final count)."""
    check_schedule(final_sparsity, shots, kind)
    removed_so_far = as_int(removed_so_far, "removed_so_far")
    if removed_so_far < 0:
        raise ValueError(f"removed_so_far must be >= 0, got {removed_so_far}")
    shot = as_int(shot, "shot")
    shots = as_int(shots, "shots")
    if not 0 <= shot < shots:
        raise ValueError(f"shot must satisfy 0 <= shot < shots ({shots}), got {shot}")
    counts = _counts(total, final_sparsity, shots, kind)
    return max(counts[shot] - removed_so_far, 0)
