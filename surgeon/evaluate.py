"""Perplexity with the protocol every reported number uses (non-overlapping windows, mean token NLL)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: Any = None,
) -> float:
    """exp(mean next-token NLL) over the non-overlapping ``seqlen`` windows of the 1-D stream ``ids``.

    The tail shorter than one window is dropped, as in the usual WikiText-2 protocol; every window
    contributes ``seqlen - 1`` predictions.
    """
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, n, batch_size)
    for s in progress(starts) if progress else starts:
        x = windows[s : s + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
