"""Numerically careful linear algebra shared by every curvature-based method.

Pruning needs inverses of curvature matrices (K-FAC factors, activation Gram matrices) that are often
ill-conditioned: dead inputs give zero rows, and few calibration tokens give rank deficiency. Everything
here works in the matrix's own dtype (fp32 in practice), escalates damping instead of failing, and logs
when it had to.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["add_damping", "damped", "damped_inverse", "live_mask"]


def live_mask(M: torch.Tensor) -> torch.Tensor:
    """Rows/columns of a PSD matrix that carry signal (a strictly positive diagonal)."""
    return torch.diagonal(M) > 0


DAMPING_MODES = ("mean", "diagonal")


def add_damping(M: torch.Tensor, rel: float, mode: str = "mean") -> torch.Tensor:
    """``M + rel * mean(diag M) * I`` (``mode="mean"``) or ``M + rel * diag(M)`` (``mode="diagonal"``), a
    new tensor. Both are scale-free; the diagonal form also ignores how each coordinate is scaled, so a
    few outlier channels (LLM activations have them) do not set the damping of all the others."""
    if rel < 0:
        raise ValueError(f"damping must be >= 0, got {rel}")
    if mode not in DAMPING_MODES:
        raise ValueError(f"damping mode must be one of {DAMPING_MODES}, got {mode!r}")
    d = torch.diagonal(M)
    mean = d.mean() if d.numel() else M.new_tensor(0.0)
    if not torch.isfinite(mean):
        raise ValueError("curvature matrix contains NaN or Inf")
    eps = rel * mean if mean > 0 else M.new_tensor(rel)
    if mode == "diagonal":  # a coordinate with no curvature of its own falls back to the mean form
        eps = torch.where(d > 0, rel * d, eps)
    out = M.clone()
    out.diagonal().add_(eps)
    return out


def damped(M: torch.Tensor, rel_damp: float, mode: str = "mean") -> torch.Tensor:
    """The matrix that :func:`damped_inverse` inverts: the live block damped by ``rel_damp`` (see
    :func:`add_damping` for ``mode``), dead rows and columns left at zero (so they stay out of every product)."""
    live = live_mask(M)
    out = torch.zeros_like(M)
    if bool(live.any()):
        idx = live.nonzero().squeeze(1)
        out[idx.unsqueeze(1), idx.unsqueeze(0)] = add_damping(M[live][:, live], rel_damp, mode)
    return out


def damped_inverse(
    M: torch.Tensor,
    rel_damp: float,
    *,
    name: str = "matrix",
    max_tries: int = 8,
    mode: str = "mean",
) -> torch.Tensor:
    """Inverse of ``M`` damped by ``rel_damp`` relative to its diagonal (``mode``: see :func:`add_damping`),
    via Cholesky.

    Dead rows/columns (zero diagonal) are left out of the factorisation and get a zero row and
    column in the result, so they never leak into updates of live weights. When the damped matrix
    is still not positive definite in floating point, the damping is multiplied by 10 (with a
    logged warning) up to ``max_tries`` times before giving up with a clear error.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name}: curvature contains NaN or Inf")
    live = live_mask(M)
    out = torch.zeros_like(M)
    if not bool(live.any()):
        return out
    sub = M[live][:, live]
    damp = rel_damp
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(add_damping(sub, damp, mode))
        if int(info) == 0:
            if attempt:
                logger.warning("%s: not positive definite, damping raised to %.3g", name, damp)
            inv = torch.cholesky_inverse(L)
            idx = live.nonzero().squeeze(1)
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = inv
            return out
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError(f"{name}: not positive definite even with relative damping {damp:g}")
