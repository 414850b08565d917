"""Low-rank updates between shots: a short first-order fine-tune absorbed into the pruned weights.

Every prunable linear gets a rank-r adapter ``W + B A`` (B starts at zero, so the model is unchanged at
step 0). Only the adapters train, on the calibration windows with the LM loss. The product ``B A`` is then
added to ``W`` through the current sparsity mask, so removed weights stay exactly zero.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from .methods.base import Context

__all__ = ["lowrank_update"]


def lowrank_update(ctx: Context, *, rank: int, steps: int, lr: float,
                   masks: dict[str, torch.Tensor] | None = None) -> float:
    """Fine-tune rank-``rank`` adapters for ``steps`` steps, absorb them; returns the last loss.

    ``masks`` (True = kept, per linear name) says where the update may land; without it, the
    non-zero weights (a structured model has no masked entries)."""
    if rank < 1 or steps < 1:
        raise ValueError(f"low-rank update needs rank >= 1 and steps >= 1, got {rank} and {steps}")
    linears = ctx.adapter.linears()
    g = torch.Generator(device="cpu").manual_seed(ctx.config.seed)
    adapters: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    handles = []
    for name, lin in linears.items():
        r = min(rank, lin.in_features, lin.out_features)
        a = torch.randn(r, lin.in_features, generator=g) / math.sqrt(lin.in_features)
        A = nn.Parameter(a.to(lin.weight.device))
        B = nn.Parameter(torch.zeros(lin.out_features, r, device=lin.weight.device))
        adapters[name] = (A, B)
        handles.append(lin.register_forward_hook(
            lambda mod, inp, out, A=A, B=B: out + (inp[0].to(A.dtype) @ A.t() @ B.t()).to(out.dtype)))
    params = [p for ab in adapters.values() for p in ab]
    frozen = [p for p in ctx.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    was_training = ctx.model.training
    ctx.model.train(False)
    loss_value = float("nan")
    try:
        for batch in itertools.islice(itertools.cycle(list(ctx.batches())), steps):
            with ctx.autocast():
                loss = ctx.model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ValueError("low-rank update: loss became NaN/Inf; lower lowrank_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        ctx.model.train(was_training)
    with torch.no_grad():
        for name, lin in linears.items():
            A, B = adapters[name]
            delta = (B @ A).to(lin.weight.dtype)
            keep = masks[name] if masks is not None else lin.weight != 0
            lin.weight.add_(delta * keep)
    return loss_value
