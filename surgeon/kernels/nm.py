"""Torch twin of the native N:M selection.

In every group of ``m`` consecutive entries of a row, the ``n`` highest scores are kept; equal
scores keep the lower position; ``-0.0`` equals ``0.0``; NaN is an error naming the first row that
holds one. Runs on the scores' device.
"""

from __future__ import annotations

import torch

from ._checks import check_nm, nan_score_message
from .order import order_key

__all__ = ["nm_mask"]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, ``True`` = keep) of a 2-D float32 score tensor, same shape and device."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError("scores must be a 2-D float32 tensor")
    rows, cols = scores.shape
    n, m = check_nm(rows, cols, n, m)
    scores = scores.detach()
    if scores.numel() == 0:
        return torch.zeros((rows, cols), dtype=torch.bool, device=scores.device)
    nan_rows = torch.isnan(scores).any(dim=1)
    if bool(nan_rows.any()):
        raise ValueError(nan_score_message(int(nan_rows.nonzero()[0, 0])))
    keys = order_key(scores).reshape(rows, cols // m, m)
    # Stable descending sort of integer keys: equal scores stay in position order.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(keys.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)
