"""Global selection: which structures or weights of the whole model go in a shot.

Costs of every layer are pooled and the cheapest go first ("prune most where it hurts least"): the
per-layer allocation is an *output*. Ties are broken by array order, then position, everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend

__all__ = ["select_budget", "select_count"]


def select_budget(
    costs: Sequence[torch.Tensor],
    weights: Sequence[int],
    budget: int,
    *,
    min_keep: int | Sequence[int] = 1,
    fill: bool = True,
    exclude: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Indices to remove from each cost array, spending at most ``budget`` parameters.

    Element ``j`` of array ``i`` costs ``costs[i][j]`` and frees ``weights[i]`` parameters. The
    longest prefix of the global cost order that fits the budget is taken (the native weighted
    threshold); with ``fill`` the leftover budget is then spent on later structures that still fit
    (small MLP channels after a large head group), so the final size lands within one smallest
    structure of the target. The ``min_keep`` most expensive structures of each array (one count for
    all arrays, or one per array) are never taken, nor are the positions in ``exclude[i]`` (structures
    already taken by an earlier call); guarded positions are counted among those not excluded.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    keeps = [int(min_keep)] * len(costs) if isinstance(min_keep, int) else [int(k) for k in min_keep]
    if len(keeps) != len(costs) or (exclude is not None and len(exclude) != len(costs)):
        raise ValueError(f"min_keep and exclude need one entry per cost array ({len(costs)})")
    guarded = []
    for i, c in enumerate(costs):
        c = c.detach().float().flatten().cpu().clone()
        ex = exclude[i] if exclude is not None else None
        if ex is not None and ex.numel():
            c[torch.as_tensor(ex, dtype=torch.long).cpu()] = float("inf")
        live = int(torch.isfinite(c).sum()) if ex is not None else c.numel()
        k = min(keeps[i], live)
        if k > 0:  # the last entries of the array's own order among the live ones (ties: highest position)
            order = torch.sort(c, stable=True).indices
            order = order[torch.isfinite(c[order])] if ex is not None else order
            c[order[-k:]] = float("inf")
        guarded.append(c)
    finite = sum(int(torch.isfinite(c).sum()) * int(w) for c, w in zip(guarded, weights))
    budget = min(budget, finite)  # guarded (+inf) entries sort last: never let the prefix reach them
    chosen = _backend.select_smallest(guarded, budget, weights=list(weights))
    picked = [torch.as_tensor(ix, dtype=torch.long) for ix in chosen]
    spent = sum(int(p.numel()) * int(w) for p, w in zip(picked, weights))
    if fill and spent < budget:
        picked = _fill(guarded, weights, picked, budget - spent)
    return picked


def _fill(costs: list[torch.Tensor], weights: Sequence[int], picked: list[torch.Tensor], left: int) -> list[torch.Tensor]:
    """Greedily add, in global cost order, the untaken finite entries whose weight still fits."""
    if not costs:
        return picked
    flat = torch.cat(costs)
    owner = torch.cat([torch.full((c.numel(),), i, dtype=torch.long) for i, c in enumerate(costs)])
    offsets = torch.tensor([0] + [c.numel() for c in costs]).cumsum(0)
    w = torch.as_tensor(list(weights), dtype=torch.long)[owner]
    free = torch.isfinite(flat) & (w <= left)
    for i, p in enumerate(picked):
        free[offsets[i] + p] = False
    cand = free.nonzero().flatten()
    order = cand[torch.sort(flat[cand], stable=True).indices]
    extra: list[list[int]] = [[] for _ in costs]
    smallest = int(w[order].min()) if order.numel() else left + 1
    for g, wi, oi in zip(order.tolist(), w[order].tolist(), owner[order].tolist()):
        if left < smallest:
            break
        if wi <= left:
            extra[oi].append(g - int(offsets[oi]))
            left -= wi
    return [torch.cat([p, torch.tensor(e, dtype=torch.long)]).sort().values for p, e in zip(picked, extra)]


def select_count(costs: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Positions (flat) of the ``k`` globally cheapest entries, per array (unstructured threshold)."""
    chosen = _backend.select_smallest(list(costs), k)
    return [torch.as_tensor(ix, dtype=torch.long) for ix in chosen]
