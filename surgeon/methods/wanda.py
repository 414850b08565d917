"""Wanda (Sun et al., 2023): prune by |W_ij|·‖X_j‖₂ within each output row; no weight update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..masks import nm_mask, row_mask
from ..sequential import ColumnNorms, LayerStep, for_each_layer, timed
from .base import Context, register

__all__ = ["WandaConfig", "wanda_mask", "wanda_scores"]


@dataclass(frozen=True)
class WandaConfig(MethodConfig):
    """Unstructured: ``int(round(s·C))`` weights removed per row; N:M: N kept in every M inputs of a row."""

    method: ClassVar[str] = "wanda"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "nm")

    offload: str = option("auto", "keep cached activations on the CPU between blocks: 'auto', 'yes' or 'no'")


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ in fp32."""
    return weight.float().abs() * col_norms.float()[None, :]


def wanda_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask compared within rows (Wanda's output-wise groups), or N:M when ``nm`` is given."""
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


def offload_flag(value: str) -> bool | str:
    if value not in ("auto", "yes", "no"):
        raise ValueError(f"offload must be 'auto', 'yes' or 'no', got {value!r}")
    return "auto" if value == "auto" else value == "yes"


@register(WandaConfig)
@torch.no_grad()
def run(ctx: Context) -> None:
    cfg: WandaConfig = ctx.config  # type: ignore[assignment]
    nm = cfg.nm if cfg.structure_kind == "nm" else None

    def step(s: LayerStep) -> None:
        stats = s.collect(ColumnNorms.of)
        with ctx.phase("prune"):
            for name, lin in s.linears.items():
                with timed(ctx, name) as rec:
                    keep = wanda_mask(wanda_scores(lin.weight, stats[name].norms), cfg.sparsity, nm)
                    lin.weight.data.masked_fill_(~keep, 0)
                    rec["pruned"] = int((~keep).sum())

    for_each_layer(ctx, step, offload=offload_flag(cfg.offload), desc="wanda", checkpoint=True)
