"""ADMM weight update and gradual pruning (Boža, 2024): min ‖XW₀ᵀ − XWᵀ‖² subject to a sparsity mask.

Everything runs in a preconditioned space W' = W·D with D = diag(sqrt(H_jj)), H = XᵀX: there Ĥ = D⁻¹HD⁻¹
has a unit diagonal (one damping value fits every layer) and |W'| is exactly Wanda's score. With
Ĥ_λ = Ĥ + λI the problem per row is min (w' − w'₀)ᵀ Ĥ_λ (w' − w'₀) with the pruned entries zero, and
ADMM (splitting W' = Z, Z masked) needs a single inverse (Ĥ_λ + ρI)⁻¹ for all rows and iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import distributed
from ..config import MethodConfig, option
from ..masks import capped_row_mask, nm_mask, row_mask
from ..sequential import Gram, LayerStep, for_each_layer, output_error, timed
from .base import Context, register
from .wanda import offload_flag

__all__ = ["AdmmConfig", "Preconditioned", "admm_nm_mask", "admm_prune", "admm_update", "cubic_schedule",
           "refit_to_dense"]


@dataclass(frozen=True)
class AdmmConfig(MethodConfig):
    """ADMM least-squares update after a mask (``gradual=False``) or with a mask that grows (``gradual=True``)."""

    method: ClassVar[str] = "admm"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "nm")

    gradual: bool = option(True, "re-select the mask from |W'+U| along a cubic schedule (the paper's best)")
    iterations: int = option(20, "ADMM iterations per layer")
    gradual_iterations: int = option(15, "iterations over which the gradual mask reaches the target (K)")
    rho: float = option(1.0, "ADMM penalty ρ (constant: one matrix inverse per input)")
    damp: float = option(0.1, "damping relative to the mean diagonal of the preconditioned Gram matrix")
    mask_from: str = option("wanda", "fixed mask of the non-gradual variant: 'wanda' or 'magnitude' (per row / N:M)")
    offload: str = option("auto", "keep cached activations on the CPU between blocks: 'auto', 'yes' or 'no'")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_from not in ("wanda", "magnitude"):
            raise ValueError(f"mask_from must be 'wanda' or 'magnitude', got {self.mask_from!r}")
        if self.iterations < 1 or not 1 <= self.gradual_iterations <= self.iterations:
            raise ValueError("need iterations >= 1 and 1 <= gradual_iterations <= iterations")
        if self.rho <= 0 or self.damp < 0:
            raise ValueError("need rho > 0 and damp >= 0")


def cubic_schedule(sparsity: float, k: int, steps: int) -> float:
    """s_k = s·(1 − (1 − k/K)³): fast early growth, the target exactly at k = K."""
    return sparsity * (1.0 - (1.0 - min(k, steps) / steps) ** 3)


@dataclass
class Preconditioned:
    """A layer input's Gram matrix made ready for ADMM; linears that share an input share one.

    ``hh`` is Ĥ_λ = D⁻¹HD⁻¹ + λI with λ = ``damp``·mean(diag D⁻¹HD⁻¹), ``d`` the scales sqrt(H_jj) (1
    for a dead input: its row of Ĥ is zero, so only the damping holds its weights, which stay at their
    value unless the mask removes them), ``inv`` = (Ĥ_λ + ρI)⁻¹.
    """

    hh: torch.Tensor
    d: torch.Tensor
    inv: torch.Tensor
    rho: float

    @classmethod
    def from_gram(cls, gram: torch.Tensor, *, damp: float = 0.1, rho: float = 1.0) -> Preconditioned:
        H = gram.double() if gram.dtype == torch.float64 else gram.float()
        diag = torch.diagonal(H)
        d = torch.where(diag > 0, diag.clamp(min=0).sqrt(), torch.ones_like(diag))
        hh = H / d[:, None] / d[None, :]
        hh.diagonal().add_(damp * torch.diagonal(hh).mean())
        A = hh.clone()
        A.diagonal().add_(rho)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(A))
        return cls(hh, d, inv, rho)

    def solve(self, weight: torch.Tensor, iterations: int, **how: Any) -> torch.Tensor:
        """Run ADMM from ``weight`` and return the de-preconditioned Z (exact zeros where the mask prunes);
        ``how``: a fixed keep-``mask``, or ``select`` and ``gradual_iterations`` (:meth:`iterate`)."""
        return self.iterate(weight, iterations, **how)[0]

    def iterate(
        self,
        weight: torch.Tensor,
        iterations: int,
        mask: torch.Tensor | None = None,
        select: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        gradual_iterations: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Z and the keep-mask it ended with (bool). ``mask`` is a fixed keep-mask; otherwise
        ``select(|W'+U|, k)`` re-selects it at iterations k = 1..``gradual_iterations`` and the last one is
        kept afterwards."""
        w0p = weight.to(self.hh.dtype) * self.d[None, :]
        base = w0p @ self.hh  # Ĥ acts on columns; rows are independent (Ĥ is symmetric)
        W, U, Z = w0p.clone(), torch.zeros_like(w0p), w0p
        keep = None if mask is None else mask.to(w0p.device, torch.bool).to(w0p.dtype)
        for t in range(1, iterations + 1):
            V = W + U
            if select is not None and t <= gradual_iterations:
                keep = select(V.abs(), t).to(V.dtype)
            Z = V * keep
            U = V - Z  # U + W' − Z
            W = (base + self.rho * (Z - U)) @ self.inv
        return Z / self.d[None, :], keep.bool()


def _prepared(gram: torch.Tensor | Preconditioned, damp: float, rho: float) -> Preconditioned:
    return gram if isinstance(gram, Preconditioned) else Preconditioned.from_gram(gram, damp=damp, rho=rho)


def admm_update(
    weight: torch.Tensor,
    gram: torch.Tensor | Preconditioned,
    mask: torch.Tensor,
    *,
    rho: float = 1.0,
    iterations: int = 20,
    damp: float = 0.1,
) -> torch.Tensor:
    """Least-squares update of ``weight`` [R, C] restricted to any keep-``mask`` (from any method), in fp32.

    ``gram`` is XᵀX [C, C] (any positive scale) or a :class:`Preconditioned`. Returns the new weight
    with exact zeros where ``mask`` is False; it converges to the damped masked least-squares optimum
    as ``iterations`` grows.
    """
    return _prepared(gram, damp, rho).solve(weight, iterations, mask=mask)


def admm_prune(
    weight: torch.Tensor,
    gram: torch.Tensor | Preconditioned,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    gradual: bool = True,
    iterations: int = 20,
    gradual_iterations: int = 15,
    rho: float = 1.0,
    damp: float = 0.1,
    mask_from: str = "wanda",
) -> torch.Tensor:
    """Prune ``weight`` to ``sparsity`` per row (``int(round(s·C))`` zeros) or to ``nm``, with ADMM updates.

    Gradual: at iteration k ≤ K the mask keeps the largest |W'+U| at sparsity s_k (cubic schedule),
    per row; for N:M the intermediate masks prune at most M−N of every group, so that s_K is exactly
    N:M. Otherwise the mask is fixed first: Wanda's (|W'|) or magnitude's (|W|), per row or N:M.
    """
    pre = _prepared(gram, damp, rho)
    if gradual:
        def select(scores: torch.Tensor, k: int) -> torch.Tensor:
            s = cubic_schedule(sparsity, k, gradual_iterations)
            return capped_row_mask(scores, s, *nm) if nm else row_mask(scores, s)

        return pre.solve(weight, iterations, select=select, gradual_iterations=gradual_iterations)
    w = weight.to(pre.hh.dtype)
    scores = (w * pre.d[None, :]).abs() if mask_from == "wanda" else w.abs()
    keep = nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)
    return pre.solve(weight, iterations, mask=keep)


def admm_nm_mask(
    weight: torch.Tensor,
    gram: torch.Tensor | Preconditioned,
    n: int,
    m: int,
    *,
    keep: torch.Tensor | None = None,
    iterations: int = 20,
    gradual_iterations: int = 15,
    rho: float = 1.0,
    damp: float = 0.1,
    sparsity: float | None = None,
) -> torch.Tensor:
    """The N:M keep-mask that gradual ADMM (:func:`admm_prune`) ends with, for another method to fill.

    Entries outside ``keep`` (zeros an earlier step chose; at most ``m - n`` per group) are removed
    first at every re-selection, so the mask extends them. Returns a bool mask, exactly N:M; with
    ``sparsity`` below ``1 - n/m``, a step toward it: that share of every row removed, at most ``m - n``
    of any group (a row whose earlier zeros exceed the share keeps fewer; the caller keeps them removed).
    """
    pre = _prepared(gram, damp, rho)
    forced = None if keep is None else ~keep.to(weight.device, torch.bool)
    if forced is not None and int(forced.view(forced.shape[0], -1, m).sum(-1).max()) > m - n:
        raise ValueError(f"keep removes more than {m - n} of some group of {m}: no {n}:{m} mask extends it")
    full = 1.0 - n / m
    if sparsity is None:
        sparsity = full
    elif not 0.0 <= sparsity <= full + 1e-12:
        raise ValueError(f"an {n}:{m} mask removes at most {full:g} of a row, got sparsity {sparsity}")

    def select(scores: torch.Tensor, k: int) -> torch.Tensor:
        if forced is not None:
            scores = scores.masked_fill(forced, -1.0)  # below every |W' + U|
        return capped_row_mask(scores, cubic_schedule(sparsity, k, gradual_iterations), n, m)

    return pre.iterate(weight, iterations, select=select, gradual_iterations=gradual_iterations)[1]


@register(AdmmConfig)
@torch.no_grad()
def run(ctx: Context) -> None:
    cfg: AdmmConfig = ctx.config  # type: ignore[assignment]
    nm = cfg.nm if cfg.structure_kind == "nm" else None

    def step(s: LayerStep) -> None:
        stats = s.collect(Gram.of)
        prepared: dict[int, Preconditioned] = {}
        with ctx.phase("prune"):
            for name, lin in s.linears.items():
                with timed(ctx, name) as rec:
                    w0 = lin.weight.data
                    g = stats[name].sum
                    if id(g) not in prepared:  # q/k/v and gate/up share one input, hence one inverse
                        prepared[id(g)] = Preconditioned.from_gram(g, damp=cfg.damp, rho=cfg.rho)
                    w = admm_prune(w0, prepared[id(g)], cfg.sparsity, nm=nm, gradual=cfg.gradual,
                                   iterations=cfg.iterations, gradual_iterations=cfg.gradual_iterations,
                                   mask_from=cfg.mask_from)
                    rec["error"] = output_error(w0, w, g)
                    w0.copy_(w.to(w0.dtype))

    for_each_layer(ctx, step, offload=offload_flag(cfg.offload), desc="admm", checkpoint=True)


@torch.no_grad()
def refit_to_dense(
    ctx: Context,
    dense: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    *,
    iterations: int = 50,
    damp: float = 0.1,
    rho: float = 1.0,
) -> dict[str, float]:
    """Refit every prunable linear, on its keep-mask, to the outputs its ``dense`` weights would give.

    Block by block on the inputs of the blocks already refitted (as :func:`run`), each linear gets the
    damped masked least-squares optimum min ‖XW_denseᵀ − XWᵀ‖² by :func:`admm_update`: the mask stays
    what another method chose (LLM Surgeon's, from global K-FAC costs), only the weights that fill it
    change. Returns the summed relative output errors (:func:`output_error`, the same Gram matrices)
    of the weights before and after. In a data-parallel run rank 0 solves and broadcasts each weight.
    """
    totals = {"error_before": 0.0, "error_after": 0.0}

    def step(s: LayerStep) -> None:
        linears = s.linears
        stats = s.collect(Gram.of)
        prepared: dict[int, Preconditioned] = {}

        def solve(name: str) -> torch.Tensor:
            lin, g = linears[name], stats[name].sum
            if id(g) not in prepared:
                prepared[id(g)] = Preconditioned.from_gram(g, damp=damp, rho=rho)
            w0 = dense[name].to(lin.weight.device, torch.float32)
            w = prepared[id(g)].solve(w0, iterations, mask=masks[name].to(lin.weight.device))
            totals["error_before"] += output_error(w0, lin.weight.data, g)
            totals["error_after"] += output_error(w0, w, g)
            return w.to(lin.weight.dtype)

        with ctx.phase("refit"):
            names = list(linears)
            new = distributed.spread(names, solve, dict.fromkeys(names, 0),
                                     lambda n: (tuple(linears[n].weight.shape), linears[n].weight.dtype,
                                                linears[n].weight.device))
            for name, w in new.items():
                linears[name].weight.data.copy_(w)

    for_each_layer(ctx, step, desc="refit")
    return totals
