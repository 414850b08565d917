"""Low-rank updates between shots: a short first-order fine-tune absorbed into the pruned weights.

Every prunable linear gets a rank-r adapter ``W + B A`` (B starts at zero, so the model is unchanged at
step 0). Only the adapters train, on the calibration windows. The product ``B A`` is then added to ``W``
through the current sparsity mask, so removed weights stay exactly zero.

What the fit targets matters more than how long it runs. ``target="labels"`` fits the calibration
text's next tokens: on SmolLM2 that bought WikiText-2 perplexity and cost out-of-domain perplexity (the
adapters learn the calibration domain). ``target="dense"`` fits the pruned model to the dense model's
predictions on the same windows (per-token KL(p_dense ‖ p_pruned)): it asks for what pruning took away,
not for the text.

``holdout`` keeps a slice of the calibration windows (the last ones; the windows are drawn at random
offsets) out of the fit. Their loss is measured before the first step and every ``eval_every`` steps;
the adapters of the best evaluation are kept (none, if no step helped), and the fit stops after two
evaluations without improvement. ``masked=True`` applies the adapters through the mask in the forward
pass (``x ↦ ((B A) ⊙ M) x``), so what they learn is exactly what is absorbed; unmasked, they learn a
dense product of which the mask then drops the removed share (half at 50% sparsity).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .methods.base import Context

__all__ = ["TARGETS", "dense_teacher", "holdout_count", "kl_to", "lowrank_update"]

TARGETS = ("labels", "dense")
_PATIENCE = 2  # evaluations without improvement before the fit stops


def dense_teacher(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of ``model`` (in ``dtype``, default its own) whose predictions ``target="dense"`` fits."""
    teacher = copy.deepcopy(model)
    if dtype is not None:
        teacher.to(dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def holdout_count(n_windows: int, fraction: float) -> int:
    """Windows held out of ``n_windows`` for a fraction: at least one when asked for, never all."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"low-rank holdout must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return 0
    if n_windows < 2:
        raise ValueError(f"a low-rank holdout needs at least 2 calibration windows, got {n_windows}")
    return min(max(1, round(fraction * n_windows)), n_windows - 1)


def _batches(ctx: Context, windows: torch.Tensor) -> Iterator[torch.Tensor]:
    for s in range(0, windows.shape[0], ctx.batch_size):
        yield windows[s : s + ctx.batch_size].to(ctx.device, non_blocking=True)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits


def _kl_sum(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    s = F.log_softmax(logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum()


def kl_to(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p), in fp32, one window (leading index) at a time.

    Each window's fp32 log-softmaxes are recomputed in the backward pass instead of kept: at once, for
    SmolLM2's 49k-token vocabulary and 8 × 2048 tokens, they held most of a 33 GB peak for a 135M model.
    """
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and logits {tuple(logits.shape)} differ")
    tokens = logits.shape[:-1].numel()
    total = logits.new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher_logits.unbind(0), logits.unbind(0)):
        if s.requires_grad:
            total = total + checkpoint(_kl_sum, t, s, use_reentrant=False)
        else:
            total = total + _kl_sum(t, s)
    return total / tokens


def lowrank_update(ctx: Context, *, rank: int, steps: int, lr: float,
                   masks: dict[str, torch.Tensor] | None = None, target: str = "labels",
                   teacher: nn.Module | None = None, holdout: float = 0.0, eval_every: int = 5,
                   masked: bool = False) -> dict[str, Any]:
    """Fine-tune rank-``rank`` adapters for at most ``steps`` steps and absorb them (see the module).

    ``masks`` (True = kept, per linear name) says where the update may land; without it, the
    non-zero weights (a structured model has no masked entries). ``teacher`` (from
    :func:`dense_teacher`) is needed for ``target="dense"``. Returns ``loss`` (the last training
    loss), ``steps`` (those run) and, with a holdout, ``holdout_before``/``holdout_after`` and
    ``kept_step`` (0: nothing absorbed).
    """
    if rank < 1 or steps < 1:
        raise ValueError(f"low-rank update needs rank >= 1 and steps >= 1, got {rank} and {steps}")
    if target not in TARGETS:
        raise ValueError(f"low-rank target must be one of {TARGETS}, got {target!r}")
    if target == "dense" and teacher is None:
        raise ValueError("low-rank target 'dense' needs the dense model as teacher (surgeon.lowrank.dense_teacher)")
    if eval_every < 1:
        raise ValueError(f"low-rank eval_every must be >= 1, got {eval_every}")
    windows = ctx.calibration
    n_hold = holdout_count(windows.shape[0], holdout)
    train, held = windows[: windows.shape[0] - n_hold], windows[windows.shape[0] - n_hold :]
    linears = ctx.adapter.linears()
    keeps = {name: masks[name] if masks is not None else lin.weight != 0 for name, lin in linears.items()}
    g = torch.Generator(device="cpu").manual_seed(ctx.config.seed)
    adapters: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    handles = []
    for name, lin in linears.items():
        r = min(rank, lin.in_features, lin.out_features)
        a = torch.randn(r, lin.in_features, generator=g) / math.sqrt(lin.in_features)
        A = nn.Parameter(a.to(lin.weight.device))
        B = nn.Parameter(torch.zeros(lin.out_features, r, device=lin.weight.device))
        adapters[name] = (A, B)
        if masked:
            keep = keeps[name].to(lin.weight.device, torch.float32)
            hook = (lambda mod, inp, out, A=A, B=B, keep=keep:
                    out + F.linear(inp[0].to(A.dtype), (B @ A) * keep).to(out.dtype))
        else:
            hook = lambda mod, inp, out, A=A, B=B: out + (inp[0].to(A.dtype) @ A.t() @ B.t()).to(out.dtype)
        handles.append(lin.register_forward_hook(hook))
    params = [p for ab in adapters.values() for p in ab]

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            if target == "labels":
                return ctx.model(input_ids=batch, labels=batch, use_cache=False).loss
            logits = _logits(ctx.model, batch)
            with torch.no_grad():
                reference = _logits(teacher, batch)
        return kl_to(reference, logits)

    @torch.no_grad()
    def held_loss() -> float:
        total, n = 0.0, 0
        for batch in _batches(ctx, held):
            total += float(loss_of(batch)) * batch.shape[0]
            n += batch.shape[0]
        return total / n

    frozen = [p for p in ctx.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    was_training = ctx.model.training
    ctx.model.train(False)
    info: dict[str, Any] = {"loss": float("nan")}
    best: list[torch.Tensor] | None = None
    try:
        if n_hold:
            info["holdout_before"] = info["holdout_after"] = held_loss()
            info["kept_step"], stale = 0, 0
        for step, batch in enumerate(itertools.islice(itertools.cycle(list(_batches(ctx, train))), steps), 1):
            loss = loss_of(batch)
            if not torch.isfinite(loss):
                raise ValueError("low-rank update: loss became NaN/Inf; lower lowrank_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            info["loss"], info["steps"] = float(loss.detach()), step
            if n_hold and (step % eval_every == 0 or step == steps):
                h = held_loss()
                if h < info["holdout_after"]:
                    info.update(holdout_after=h, kept_step=step)
                    best, stale = [p.detach().clone() for p in params], 0
                else:
                    stale += 1
                    if stale >= _PATIENCE:
                        break
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        ctx.model.train(was_training)
    if n_hold:
        if best is None:
            return info
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    with torch.no_grad():
        for name, lin in linears.items():
            A, B = adapters[name]
            delta = (B @ A).to(lin.weight.dtype)
            lin.weight.add_(delta * keeps[name].to(lin.weight.device))
    return info
