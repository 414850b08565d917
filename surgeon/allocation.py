"""How a structured shot spends its parameter budget over the layers' structure groups.

``plan`` turns per-structure costs into the structures each group loses in this shot:

- ``allocation="global"``: one threshold over every group's costs ("prune most where it hurts least"),
  ranked by absolute cost or by cost per freed parameter (a knapsack greedy: one attention group frees as
  many parameters as hundreds of MLP channels, so absolute costs almost never pick it).
- ``allocation="uniform"``: every layer loses the same number of structures of each kind, so all layers
  keep one shape and the pruned model is a stock config. The global costs choose the mix: of all per-layer
  removal counts that spend the budget, the one with the least summed cost (each layer removes its own
  cheapest structures).
- MLP widths kept at multiples of ``align`` (fast GPU matrix kernels): in every shot, by pricing chunks of
  ``align`` channels (a layer's cheapest first) as one structure, or only in the last shot, by rounding each
  layer's width to the nearest multiple. Head counts need no rounding: each head adds ``head_dim`` (64 or
  128) rows, already a multiple of the kernels' tiles.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from .adapters.base import StructureGroup
from .selection import select_budget

__all__ = ["ALLOCATIONS", "RANKS", "effective_multiple", "plan"]

ALLOCATIONS = ("global", "uniform")
RANKS = ("cost", "per_param")
#: a layer keeps at least this many multiples of its alignment, or the multiple is halved
MIN_CHUNKS = 4

Freed = Callable[[Sequence[torch.Tensor]], int]


def effective_multiple(group: StructureGroup, align: int) -> int:
    """The multiple that ``group``'s width is kept at: ``align`` for MLP groups, halved (down to 1) until
    the layer's unpruned width holds at least ``MIN_CHUNKS`` multiples, so small layers are never frozen
    by it (the rule looks at the unpruned width, so a layer's multiple never changes during a run)."""
    if group.kind != "mlp":
        return 1
    width = group.full_count or group.count
    a = max(1, int(align))
    while a > 1 and width < MIN_CHUNKS * a:
        a //= 2
    return a


def plan(groups: Sequence[StructureGroup], costs: Sequence[torch.Tensor], budget: int, freed: Freed, *,
         rank: str = "cost", allocation: str = "global", align: int = 1, align_every: bool = False,
         final: bool = False) -> list[torch.Tensor]:
    """Sorted structure indices to remove from each group, spending at most about ``budget`` parameters.

    ``freed(picks)`` is the number of parameters that removing ``picks`` (one index tensor per group)
    frees: groups that share a linear (KV groups and query slots) free less together than apart.
    ``align_every`` keeps MLP widths at multiples of ``align`` in every shot, otherwise they are rounded
    in the ``final`` shot.
    """
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    costs = [c.detach().float().flatten().cpu() for c in costs]
    aligned = align > 1 and (align_every or final)
    if allocation == "uniform":
        return _uniform(groups, costs, budget, freed, align if aligned else 1)
    picks = _global(groups, costs, budget, freed, rank, align if align_every else 1)
    if final and align > 1:
        picks = _round_widths(groups, costs, picks, align)
    return picks


# -- global threshold --------------------------------------------------------------------------------


def _global(groups: Sequence[StructureGroup], costs: list[torch.Tensor], budget: int, freed: Freed, rank: str,
            align: int) -> list[torch.Tensor]:
    """One threshold over all groups; aligned MLP groups enter as chunks of their cheapest channels.

    A width that is not a multiple yet first loses its ``width % multiple`` cheapest channels as one
    chunk (never guarded); that chunk precedes the group's full chunks in the cost order, so a full
    chunk is only taken after it.
    """
    arrays: list[torch.Tensor] = []
    weights: list[int] = []
    keeps: list[int] = []
    members: list[tuple[int, torch.Tensor]] = []  # (group, [entries, structures per entry])
    for gi, (g, c) in enumerate(zip(groups, costs)):
        a = effective_multiple(g, align)
        if a == 1:
            arrays.append(c)
            weights.append(g.params_per_structure)
            keeps.append(1)
            members.append((gi, torch.arange(g.count).view(-1, 1)))
            continue
        order = torch.sort(c, stable=True).indices
        r = g.count % a
        if r:
            arrays.append(c[order[:r]].sum().view(1))
            weights.append(r * g.params_per_structure)
            keeps.append(0)
            members.append((gi, order[:r].view(1, r)))
        full = order[r:].view(-1, a)
        arrays.append(c[full].sum(1))
        weights.append(a * g.params_per_structure)
        keeps.append(1)
        members.append((gi, full))
    if rank == "per_param":
        arrays = [c / w for c, w in zip(arrays, weights)]

    def to_groups(chosen: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[list[torch.Tensor]] = [[] for _ in groups]
        for (gi, mem), ch in zip(members, chosen):
            if ch.numel():
                out[gi].append(mem[ch].flatten())
        return [torch.cat(o).sort().values if o else torch.zeros(0, dtype=torch.long) for o in out]

    chosen = select_budget(arrays, weights, budget, min_keep=keeps)
    # structures that share a linear free less together than their prices say: spend what is left over
    smallest = min(weights) if weights else 0
    for _ in range(4):
        left = budget - freed(to_groups(chosen))
        if left < smallest:
            break
        more = select_budget(arrays, weights, left, min_keep=keeps, exclude=chosen)
        if not any(m.numel() for m in more):
            break
        chosen = [torch.cat([c, m]).sort().values for c, m in zip(chosen, more)]
    return to_groups(chosen)


def _round_widths(groups: Sequence[StructureGroup], costs: list[torch.Tensor], picks: list[torch.Tensor],
                  align: int) -> list[torch.Tensor]:
    """Move each MLP group's remaining width to the nearest multiple of its alignment (ties: narrower).

    The price is a total size within half a multiple per layer of the target instead of within one
    channel.
    """
    out = []
    for g, c, rm in zip(groups, costs, picks):
        a = effective_multiple(g, align)
        left = g.count - rm.numel()
        if a == 1 or left % a == 0:
            out.append(rm)
            continue
        low = max(a, left // a * a)
        want = low if left - low <= (low + a) - left or low + a > g.count else low + a
        taken = torch.zeros(g.count, dtype=torch.bool)
        taken[rm] = True
        if want < left:  # remove the cheapest of those still kept
            order = torch.sort(torch.where(taken, torch.inf, c), stable=True).indices
            taken[order[: left - want]] = True
        else:  # keep the most expensive of those picked
            order = torch.sort(torch.where(taken, c, -torch.inf), descending=True, stable=True).indices
            taken[order[: want - left]] = False
        out.append(taken.nonzero().flatten())
    return out


# -- uniform shapes ----------------------------------------------------------------------------------


def _uniform(groups: Sequence[StructureGroup], costs: list[torch.Tensor], budget: int, freed: Freed,
             align: int) -> list[torch.Tensor]:
    """The same removal counts in every layer: the attention counts are enumerated, the MLP count fills
    the rest of the budget, and the mix with the least summed cost wins.

    The MLP moves in steps (one channel, or one multiple when aligned), so no mix spends the budget
    exactly: each mix is scored by its cost interpolated to the budget between the MLP step below and the
    step above it, and takes the nearer of the two (the size lands within half a step per layer of the
    target, on either side, as when widths are rounded at the end).
    """
    layers = sorted({g.layer for g in groups})
    by_layer = {i: [gi for gi, g in enumerate(groups) if g.layer == i] for i in layers}
    shape = [(groups[gi].kind, groups[gi].count, groups[gi].params_per_structure) for gi in by_layer[layers[0]]]
    for i in layers:
        other = [(groups[gi].kind, groups[gi].count, groups[gi].params_per_structure) for gi in by_layer[i]]
        if other != shape:
            raise ValueError(f"uniform allocation needs every layer in the same shape: layer {i} has {other}, "
                             f"layer {layers[0]} has {shape}")
    kinds = [k for k, _, _ in shape]
    if kinds.count("mlp") != 1:
        raise ValueError(f"uniform allocation needs one MLP group per layer, got kinds {kinds}")
    mlp = kinds.index("mlp")
    n_layers = len(layers)
    orders = {gi: torch.sort(costs[gi], stable=True).indices for gi in range(len(groups))}
    # summed over layers, the cost of removing each layer's k cheapest of each kind: [count + 1]
    prefix = []
    for j in range(len(shape)):
        per_layer = torch.stack([torch.cat([torch.zeros(1), costs[by_layer[i][j]][orders[by_layer[i][j]]].cumsum(0)])
                                 for i in layers])
        prefix.append(per_layer.double().sum(0))
    first = by_layer[layers[0]]
    g_mlp = groups[first[mlp]]
    a = effective_multiple(g_mlp, align)
    r = g_mlp.count % a
    # removal counts that leave a multiple of ``a`` channels (at least one multiple kept), or none
    mlp_counts = [0] + list(range(r or a, g_mlp.count - a + 1, a)) if a > 1 else list(range(g_mlp.count))
    attn = [j for j in range(len(shape)) if j != mlp]
    pps = g_mlp.params_per_structure
    cands = []
    for combo in itertools.product(*(range(shape[j][1]) for j in attn)):
        picks = [torch.zeros(0, dtype=torch.long) for _ in groups]
        for j, k in zip(attn, combo):
            picks[first[j]] = torch.arange(k)
        per_layer = freed(picks)  # what these counts free in one layer
        left = budget / n_layers - per_layer
        if left < 0:
            continue
        step = max(i for i, k in enumerate(mlp_counts) if k * pps <= left)
        attn_cost = float(sum(prefix[j][k] for j, k in zip(attn, combo)))

        def spent(k: int) -> int:
            return n_layers * (per_layer + k * pps)

        lo = mlp_counts[step]
        cost = attn_cost + float(prefix[mlp][lo])
        if step + 1 < len(mlp_counts):  # the MLP step below and above the budget, the nearer one taken
            hi = mlp_counts[step + 1]
            rate = float(prefix[mlp][hi] - prefix[mlp][lo]) / (spent(hi) - spent(lo))
            score: float | None = cost + (budget - spent(lo)) * rate
            k_mlp = lo if budget - spent(lo) <= spent(hi) - budget else hi
        else:  # the MLP cannot give more: a last resort unless the budget is met
            score, k_mlp = (cost if spent(lo) == budget else None), lo
        cands.append((score, spent(k_mlp), attn_cost + float(prefix[mlp][k_mlp]), (*combo, k_mlp)))
    if not cands:
        return [torch.zeros(0, dtype=torch.long) for _ in groups]
    scored = [c for c in cands if c[0] is not None]
    if scored:
        counts = min(scored, key=lambda c: (c[0], abs(budget - c[1])))[3]
    else:  # no mix can spend the budget: the one that frees most, then the cheapest
        counts = min(cands, key=lambda c: (-c[1], c[2]))[3]
    picks = []
    for gi, g in enumerate(groups):
        j = by_layer[g.layer].index(gi)
        k = counts[attn.index(j)] if j in attn else counts[-1]
        picks.append(orders[gi][:k].sort().values)
    return picks
