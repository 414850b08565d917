"""Torch twins of the native global threshold, selection and ranking.

Same rule as ``rust/threshold.rs``: entries are in one global order by (cost, array index, position);
every entry of array ``i`` weighs ``weights[i]``; a budget ``k`` selects the longest prefix of that
order whose total weight is at most ``k`` (it stops at the first entry that does not fit). ``-0.0``
equals ``0.0``; NaN is an error naming the array. Like the native code, the arrays are never
concatenated: weighted histograms of the order keys (11, then 11, then 10 bits, each level only
over the bucket chosen by the level before) find the exact key of the first entry that does not fit,
and a last pass counts each array's entries below and at that key. Work runs on each tensor's own
device; only the small histograms come to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import check_names, check_total_weight, check_weights, nan_cost_message
from .order import KEY_LIMIT, key_value, order_key

__all__ = ["Cut", "find_cut", "global_threshold", "rank", "select_smallest"]

# Radix levels (shift, width) over the 32-bit keys. Narrow histograms keep every per-bucket step
# small; the native code uses two 16-bit levels, with the same result.
_LEVELS = ((21, 11), (10, 11), (0, 10))


@dataclass(frozen=True)
class Cut:
    """Where the selected prefix of the global order ends.

    ``stop_key`` is the key of the first entry that does not fit (``KEY_LIMIT`` when all fit);
    ``below[i]`` counts entries of array ``i`` with a smaller key; ``ties[i]`` the selected entries
    with key ``stop_key`` (the first ones by position); ``threshold`` is the cost of the last
    selected entry, ``-inf`` when nothing is selected.
    """

    stop_key: int
    below: list[int]
    ties: list[int]
    threshold: float

    @property
    def counts(self) -> list[int]:
        return [b + t for b, t in zip(self.below, self.ties)]


def _check_arrays(arrays: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, a in enumerate(arrays):
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float32 or a.dim() != 1:
            raise ValueError(f"cost array {i} must be a 1-D float32 tensor")
        out.append(a.detach())
    return out


def _histogram(arrays: list[torch.Tensor], weights: list[int], shift: int, width: int, prefix: int) -> torch.Tensor:
    """Weighted histogram (CPU, int64) of key bits ``[shift, shift + width)`` over the entries whose
    higher bits equal ``prefix``."""
    hist = torch.zeros(1 << width, dtype=torch.int64)
    top = shift + width
    for a, w in zip(arrays, weights):
        if not a.numel():
            continue
        key = order_key(a)
        if top < 32:
            key = key[(key >> top) == prefix]
        buckets = (key >> shift) & ((1 << width) - 1)
        hist += torch.bincount(buckets, minlength=1 << width).cpu() * w
    return hist


def _first_over(hist: torch.Tensor, k: int, start: int) -> tuple[int, int]:
    """First bucket where the running weight (from ``start <= k``) exceeds ``k``, and the weight before it."""
    cum = torch.cumsum(hist, 0) + start
    bucket = int(torch.searchsorted(cum, torch.tensor([k], dtype=torch.int64), right=True)[0])
    if bucket >= hist.numel():
        raise RuntimeError("internal error: histogram lost weight")
    return bucket, int(cum[bucket]) - int(hist[bucket])


def find_cut(
    arrays: Sequence[torch.Tensor],
    k: int,
    weights: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> Cut:
    """Where the prefix selected by budget ``k`` ends (see the module docstring)."""
    arrays = _check_arrays(arrays)
    weights = check_weights(len(arrays), weights)
    names = check_names(len(arrays), names)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    total = check_total_weight(sum(a.numel() * w for a, w in zip(arrays, weights)))
    for i, a in enumerate(arrays):
        if a.numel() and bool(torch.isnan(a).any()):
            raise ValueError(nan_cost_message(i, names))

    if total <= k:
        stop = KEY_LIMIT
    else:
        stop, before = 0, 0
        for shift, width in _LEVELS:
            hist = _histogram(arrays, weights, shift, width, stop)
            bucket, before = _first_over(hist, k, before)
            stop = (stop << width) | bucket

    below, equal, max_below = [], [], -1
    for a in arrays:
        key = order_key(a)
        less = key < stop
        below.append(int(less.sum()))
        equal.append(int((key == stop).sum()))
        if below[-1]:
            max_below = max(max_below, int(key[less].max()))

    ties = [0] * len(arrays)
    if stop != KEY_LIMIT:
        left = k - sum(b * w for b, w in zip(below, weights))
        for i, w in enumerate(weights):
            take = min(equal[i], left // w)
            ties[i] = take
            left -= take * w
            if take < equal[i]:
                break

    if stop != KEY_LIMIT and any(ties):
        threshold = key_value(stop)
    elif max_below >= 0:
        threshold = key_value(max_below)
    else:
        threshold = float("-inf")
    return Cut(stop, below, ties, threshold)


def global_threshold(
    arrays: Sequence[torch.Tensor],
    k: int,
    weights: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[float, list[int]]:
    """``(threshold, counts)``: the cost of the last selected entry (``-inf`` when nothing is
    selected) and how many entries of each array are selected."""
    cut = find_cut(arrays, k, weights, names)
    return cut.threshold, cut.counts


def select_smallest(
    arrays: Sequence[torch.Tensor],
    k: int,
    weights: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Positions selected in each array (int64, ascending, on the array's device)."""
    arrays = _check_arrays(arrays)
    cut = find_cut(arrays, k, weights, names)
    out = []
    for a, tie in zip(arrays, cut.ties):
        key = order_key(a)
        chosen = key < cut.stop_key
        if tie:
            tied = (key == cut.stop_key).nonzero().flatten()[:tie]
            chosen[tied] = True
        out.append(chosen.nonzero().flatten())
    return out


def rank(costs: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``min(k, numel)`` cheapest entries, ordered by (cost, position) (int64)."""
    (positions,) = select_smallest([costs], k)
    keys = order_key(costs.detach()[positions])
    return positions[torch.sort(keys, stable=True).indices]
