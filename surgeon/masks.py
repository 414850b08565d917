"""Keep-masks from scores: per matrix, per row, N:M, with exact counts and deterministic ties.

Every function returns a boolean *keep* mask (True = the weight stays) of the scores' shape and works
on any device. Counts are exact: ties never make a mask keep more or fewer weights than asked. Among
equal scores the lower index is kept (the convention of ``surgeon._backend.nm_mask``), which follows
from ranking by a stable descending sort.

Rounding: a sparsity ``s`` over ``n`` weights prunes ``prune_count(s, n) = int(round(s * n))``
weights (Python's round, half to even). Per-row selection applies it to the row length, so a matrix
pruned row by row has ``rows * int(round(s * cols))`` zeros.
"""

from __future__ import annotations

import torch

__all__ = ["capped_row_mask", "matrix_mask", "nm_mask", "prune_count", "row_count_mask", "row_mask"]


def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a sparsity removes: ``int(round(sparsity * n))``, clipped to [0, n]."""
    return min(max(int(round(sparsity * n)), 0), n)


def _check(scores: torch.Tensor) -> None:
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` largest entries along the last dim (ties: lower index kept)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if keep <= 0:
        return mask
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return mask.scatter_(-1, order, True)


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``prune_count(sparsity, numel)`` lowest scores of the whole tensor."""
    _check(scores)
    k = prune_count(sparsity, scores.numel())
    return _keep_top(scores.reshape(-1), scores.numel() - k).reshape(scores.shape)


def row_count_mask(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Prune the ``prune`` lowest scores of every row (last dim); ``prune`` is clipped to [0, cols]."""
    _check(scores)
    cols = scores.shape[-1]
    return _keep_top(scores, cols - min(max(int(prune), 0), cols))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``prune_count(sparsity, cols)`` lowest scores of every row (last dim)."""
    return row_count_mask(scores, prune_count(sparsity, scores.shape[-1]))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every group of ``m`` consecutive entries along the last dim."""
    _check(scores)
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    if scores.shape[-1] % m:
        raise ValueError(f"M={m} does not divide the last dimension {scores.shape[-1]}")
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    return _keep_top(grouped, n).reshape(scores.shape)


def capped_row_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """Per row, prune ``prune_count(sparsity, cols)`` lowest scores, at most ``m - n`` in any group of ``m``.

    An intermediate step towards N:M (gradual pruning): at ``sparsity = 1 - n/m`` it is exactly
    :func:`nm_mask`. Only the ``m - n`` lowest of each group are eligible, and among them the lowest
    of the row are pruned; greedy selection is optimal here (a partition matroid), so this is the
    cheapest mask meeting both the count and the cap.
    """
    _check(scores)
    cols = scores.shape[-1]
    if cols % m:
        raise ValueError(f"M={m} does not divide the last dimension {cols}")
    eligible_per_row = (cols // m) * (m - n)
    k = min(prune_count(sparsity, cols), eligible_per_row)
    eligible = ~nm_mask(scores, n, m)
    scores = scores.float() if not scores.is_floating_point() else scores
    # among the eligible, keep the highest (eligible - k); ineligible ones sink below any eligible score
    low = torch.finfo(scores.dtype).min
    ranked = torch.where(eligible, scores.clamp(min=low), torch.full_like(scores, float("-inf")))
    return ~eligible | _keep_top(ranked, eligible_per_row - k)
