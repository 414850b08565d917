"""Magnitude pruning: the calibration-free baseline (per matrix, per row, N:M, or structured by weight norm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adapters import ModelAdapter, StructureGroup
from ..config import MethodConfig, option
from ..masks import matrix_mask, nm_mask, row_mask
from ..sequential import record_module
from .base import Context, register

__all__ = ["MagnitudeConfig", "structure_scores", "structured_plan"]


@dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """Remove the smallest weights; calibration data is ignored.

    Unstructured pruning compares |W| within each matrix (``scope="matrix"``, ``int(round(s·R·C))``
    zeros) or within each row (``scope="row"``, ``int(round(s·C))`` zeros per row). Structured pruning
    removes whole MLP channels and attention head groups with the smallest sum of squared weights,
    under one parameter budget across all layers.
    """

    method: ClassVar[str] = "magnitude"

    scope: str = option("matrix", "unstructured: compare weights within each 'matrix' or each 'row'")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("matrix", "row"):
            raise ValueError(f"scope must be 'matrix' or 'row', got {self.scope!r}")


def structure_scores(adapter: ModelAdapter, group: StructureGroup) -> torch.Tensor:
    """Per structure of ``group``: the sum of squared weights over its blocks in every part (fp32)."""
    scores = torch.zeros(group.count, dtype=torch.float32)
    for part in group.parts:
        w = adapter.module(part.linear).weight.detach().float()
        sq = w.square().sum(1 if part.axis == "row" else 0)
        scores += sq.reshape(group.count, part.block).sum(1).cpu()
    return scores


def structured_plan(costs: list[torch.Tensor], params: list[int], budget: float) -> list[torch.Tensor]:
    """Which structures to remove: the longest prefix of the global cost order within ``budget`` parameters.

    ``costs[g]`` are group ``g``'s structure costs and ``params[g]`` its parameters per structure. The
    order is cost ascending, ties by group then index. Each group's most expensive structure (the
    last of its own order) is left out of the order, so every group keeps at least one. Returns the
    sorted indices removed per group.
    """
    cost_l, grp_l, idx_l = [], [], []
    for g, c in enumerate(costs):
        c = c.double()
        own = torch.sort(c, stable=True).indices[:-1]  # the group's own order, its last one kept
        cost_l.append(c[own])
        grp_l.append(torch.full_like(own, g))
        idx_l.append(own)
    if not cost_l:
        return []
    cost, grp, idx = torch.cat(cost_l), torch.cat(grp_l), torch.cat(idx_l)
    # lexicographic (cost, group, index) via stable sorts from the least significant key
    order = torch.sort(idx, stable=True).indices
    order = order[torch.sort(grp[order], stable=True).indices]
    order = order[torch.sort(cost[order], stable=True).indices]
    p = torch.as_tensor(params, dtype=torch.float64)[grp[order]]
    take = int((torch.cumsum(p, 0) <= budget).sum())
    chosen = order[:take]
    return [idx[chosen][grp[chosen] == g].sort().values for g in range(len(costs))]


def _structured(ctx: Context) -> None:
    adapter = ctx.adapter
    groups = adapter.structure_groups()
    budget = ctx.config.sparsity * adapter.prunable_params()
    with ctx.phase("scores"):
        costs = [structure_scores(adapter, g) for g in groups]
    with ctx.phase("prune"):
        removed = structured_plan(costs, [g.params_per_structure for g in groups], budget)
        for g, rem in zip(ctx.tqdm(groups, desc="magnitude", unit="group"), removed):
            keep = torch.ones(g.count, dtype=torch.bool)
            keep[rem] = False
            if rem.numel():
                adapter.keep_structures(g, keep.nonzero().squeeze(1))
    ctx.report.extra["structures_removed"] = {g.name: int(r.numel()) for g, r in zip(groups, removed)}


@register(MagnitudeConfig)
@torch.no_grad()
def run(ctx: Context) -> None:
    cfg: MagnitudeConfig = ctx.config  # type: ignore[assignment]
    if cfg.structure_kind == "structured":
        _structured(ctx)
        return
    adapter = ctx.adapter
    with ctx.phase("prune"):
        for i in ctx.tqdm(range(len(adapter.layers)), desc="magnitude", unit="layer"):
            for name, lin in adapter.layer_linears(i).items():
                w = lin.weight.data
                score = w.abs()
                if cfg.structure_kind == "nm":
                    keep = nm_mask(score, *cfg.nm)
                elif cfg.scope == "row":
                    keep = row_mask(score, cfg.sparsity)
                else:
                    keep = matrix_mask(score, cfg.sparsity)
                w.masked_fill_(~keep, 0)
                record_module(ctx, name, pruned=int((~keep).sum()))
