"""SparseGPT (Frantar & Alistarh, 2023): OBS column by column with lazy block updates and adaptive masks.

The inverse Hessian is never downdated explicitly: the rows of the upper Cholesky factor U of H⁻¹
(H⁻¹ = UᵀU) are the successive downdated inverses, scaled, so one factorisation serves every column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..masks import prune_count
from ..sequential import Gram, LayerStep, for_each_layer, output_error, timed
from .base import Context, register
from .wanda import offload_flag

__all__ = ["SparseGPTConfig", "block_prune_counts", "sparsegpt_prune"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseGPTConfig(MethodConfig):
    """H = 2XᵀX/N + ``damp``·mean(diag H)·I; ``blocksize`` columns per lazy block with an adaptive mask."""

    method: ClassVar[str] = "sparsegpt"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "nm")

    damp: float = option(0.01, "damping relative to the mean diagonal of H")
    blocksize: int = option(128, "columns per lazy-update block (and per adaptive mask selection)")
    offload: str = option("auto", "keep cached activations on the CPU between blocks: 'auto', 'yes' or 'no'")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")


def block_prune_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune in each column block so that the matrix total is exactly ``prune_count(s, R·C)``.

    Block b gets round(s·end_b·R) − round(s·start_b·R): the cumulative rounding keeps every block
    within one weight of its share and the sum exact.
    """
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [prune_count(sparsity, e * rows) for e in edges]
    return [b - a for a, b in zip(cum, cum[1:])]


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries (ties: the higher index is pruned, the lower one kept)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        mask[order[scores.numel() - k:]] = True
    return mask.reshape(scores.shape)


def _inverse_cholesky(H: torch.Tensor, damp: float, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = ``damp``·mean(diag H), raising λ tenfold while it fails."""
    mean = torch.diagonal(H).mean()
    for attempt in range(tries):
        A = H.clone()
        A.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(A)
        if not int(info):
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not int(info):
                if attempt:
                    logger.warning("sparsegpt: Hessian not positive definite, damping raised to %.3g", damp)
                return U
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError(f"sparsegpt: Hessian not positive definite even with relative damping {damp:g}")


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The pruned weight (fp32, or fp64 when given fp64) from ``weight`` [R, C] and H ∝ XᵀX [C, C].

    Unstructured: in each block the ``block_prune_counts`` lowest w²/[U]_jj² (over all rows of the
    block) are pruned, so the matrix has exactly ``int(round(s·R·C))`` zeros. N:M: in each group of M
    columns the N highest scores are kept, chosen when the group's first column is reached.

    Dead inputs (H_jj = 0) cost nothing to prune: their score is 0 and their H row and column are
    set to the identity, so they never affect live weights. Unlike the reference code they are not
    zeroed wholesale (the mask stays exactly at the target sparsity), which changes no output on the
    calibration data.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.to(dtype).clone()
    H = gram.to(dtype).clone()
    R, C = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    U = _inverse_cholesky(H, damp)
    diag_u = torch.diagonal(U)
    dead_f = dead.to(dtype)
    counts = block_prune_counts(R, C, blocksize, sparsity) if nm is None else None

    for b, i1 in enumerate(range(0, C, blocksize)):
        i2 = min(i1 + blocksize, C)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = diag_u[i1:i2]
        live1 = 1.0 - dead_f[i1:i2]
        if nm is None:
            prune1 = _lowest(W1.square() / d1.square() * live1, counts[b])
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and (i1 + i) % nm[1] == 0:
                j = slice(i, i + nm[1])
                score = W1[:, j].square() / d1[j].square() * live1[j]
                grp = torch.sort(score, dim=1, descending=True, stable=True).indices[:, nm[0]:]
                prune1[:, j] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, grp, True)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


@register(SparseGPTConfig)
@torch.no_grad()
def run(ctx: Context) -> None:
    cfg: SparseGPTConfig = ctx.config  # type: ignore[assignment]
    nm = cfg.nm if cfg.structure_kind == "nm" else None
    if nm is not None and cfg.blocksize % nm[1]:
        raise ValueError(f"blocksize {cfg.blocksize} must be a multiple of M={nm[1]}")

    def step(s: LayerStep) -> None:
        stats = s.collect(Gram.of)
        with ctx.phase("prune"):
            for name, lin in s.linears.items():
                with timed(ctx, name) as rec:
                    g = stats[name]
                    H = g.sum * (2.0 / max(g.n, 1))
                    w0 = lin.weight.data
                    w = sparsegpt_prune(w0, H, cfg.sparsity, nm=nm, blocksize=cfg.blocksize, damp=cfg.damp)
                    rec["error"] = output_error(w0, w, g.sum)
                    w0.copy_(w.to(w0.dtype))

    for_each_layer(ctx, step, offload=offload_flag(cfg.offload), desc="sparsegpt", checkpoint=True)
