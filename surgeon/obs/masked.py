"""The exact masked optimum of a layer under Kronecker-factored curvature, by preconditioned conjugate gradient.

Given a layer's damped factors ``G`` (R×R) and ``A`` (C×C), a keep-mask and reference weights ``W_ref``,

    W* = argmin_W ½ tr((W − W_ref) A (W − W_ref)ᵀ G)   subject to   W = 0 wherever the mask removes.

OBS reaches this only when every zero of the mask is solved for jointly; solved in chunks (as
:func:`surgeon.obs.unstructured.prune_weights` must, the joint system being |Q|×|Q|), each chunk's
update moves weights that other chunks zeroed, they are set back to zero, and the compensation they
carried is lost: on real SmolLM2 layers the chunked result has about 1.7× the optimum's loss.

The free weights F (kept, in rows and columns that carry signal) solve the normal equations

    P_F(G D A) = −P_F(G Δ₀ A),     W* = W_ref + D on F,

where Δ₀ = W − W_ref on the fixed entries (−W_ref where the mask removes) and P_F keeps the entries
of F. The operator costs two matrix products and is symmetric positive definite on F, so conjugate
gradient applies; the preconditioner ``P_F(G⁻¹ · A⁻¹)`` (the unmasked inverse, restricted to F: SPD
on F) is what the OBS costs use already. On real layers it reaches the optimum within 0.5% in 100
iterations, where plain diagonal (Jacobi) preconditioning needs about 200.

Dead rows/columns (zero diagonal of ``Ginv``/``Ainv``, as :func:`surgeon.linalg.damped_inverse`
returns them) carry no signal: their weights are never moved (zero where removed, unchanged where kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MaskedSolution", "masked_optimum", "quadratic_loss"]


@dataclass
class MaskedSolution:
    """``weight``: the solution (exact zeros where the mask removes); ``loss``: its ½ tr(Δ A Δᵀ G)
    relative to the reference; ``start_loss``: the same for the weights given (so ``loss − start_loss`` is
    what this removal costs);
    ``iterations`` run and the final relative residual ``‖r‖ / ‖b‖``."""

    weight: torch.Tensor
    loss: float
    start_loss: float
    iterations: int
    residual: float


def quadratic_loss(delta: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """½ tr(Δ A Δᵀ G) = ½ vec(Δ)ᵀ (G ⊗ A) vec(Δ) (row-major vec), without forming G ⊗ A."""
    return 0.5 * ((G @ delta @ A) * delta).sum()


def _check(M: torch.Tensor, n: int, name: str) -> None:
    if M.shape != (n, n):
        raise ValueError(f"{name}: expected shape ({n}, {n}), got {tuple(M.shape)}")


def masked_optimum(
    W: torch.Tensor,
    keep: torch.Tensor,
    G: torch.Tensor,
    A: torch.Tensor,
    Ginv: torch.Tensor,
    Ainv: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    iterations: int = 200,
    tol: float = 1e-5,
) -> MaskedSolution:
    """Weights minimising ½ tr((W − W_ref) A (W − W_ref)ᵀ G) with zeros off ``keep`` (see the module).

    ``G``/``A`` are the damped factors, ``Ginv``/``Ainv`` their inverses (the preconditioner; their
    zero diagonal marks dead rows/columns). ``reference`` is ``W_ref`` (default: ``W``, the weights
    before this removal); CG starts from ``W`` on the kept entries, so with a reference other than
    ``W`` a good current ``W`` is a warm start. It stops after ``iterations`` or once the relative
    residual is at most ``tol``. Computes in fp32 (fp64 if ``W`` is fp64) on ``W``'s device; the result
    has ``W``'s dtype.
    """
    if W.ndim != 2:
        raise ValueError(f"W: expected a matrix, got shape {tuple(W.shape)}")
    R, C = W.shape
    if keep.dtype != torch.bool or keep.shape != W.shape:
        raise ValueError(f"keep: expected a bool tensor of shape {tuple(W.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    for M, n, name in ((G, R, "G"), (Ginv, R, "Ginv"), (A, C, "A"), (Ainv, C, "Ainv")):
        _check(M, n, name)
    if reference is not None and reference.shape != W.shape:
        raise ValueError(f"reference: expected shape {tuple(W.shape)}, got {tuple(reference.shape)}")
    if not (isinstance(iterations, int) and iterations >= 0) or tol < 0:
        raise ValueError(f"need iterations >= 0 and tol >= 0, got {iterations!r} and {tol!r}")
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    dev = W.device
    G, A, Ginv, Ainv = (M.to(device=dev, dtype=dt) for M in (G, A, Ginv, Ainv))
    keep = keep.to(dev)
    W32 = W.to(dt)
    ref = W32 if reference is None else reference.to(device=dev, dtype=dt)
    live = (Ginv.diagonal() > 0)[:, None] & (Ainv.diagonal() > 0)[None, :]
    free = keep & live
    K = free.to(dt)
    start = torch.where(keep, W32, 0.0)  # the fixed entries: zeros where removed, dead ones as they are

    def op(X: torch.Tensor) -> torch.Tensor:
        return K * (G @ X @ A)

    def precondition(X: torch.Tensor) -> torch.Tensor:
        return K * (Ginv @ X @ Ainv)

    D = K * (start - ref)
    b = -op((1 - K) * (start - ref))
    r = b - op(D)
    # relative to ‖b‖ (the residual of the reference itself); when b = 0 the reference is the answer
    scale = float(b.norm()) or float(r.norm())
    res = float(r.norm()) / scale if scale > 0 else 0.0
    done = 0
    if res > tol:
        z = precondition(r)
        p = z
        rz = (r * z).sum()
        for done in range(1, iterations + 1):
            Mp = op(p)
            curv = (p * Mp).sum()
            if not float(curv) > 0:  # converged to rounding (or a breakdown): nothing left to gain
                done -= 1
                break
            alpha = rz / curv
            D = D + alpha * p
            r = r - alpha * Mp
            res = float(r.norm()) / scale
            if res <= tol:
                break
            z = precondition(r)
            rz_next = (r * z).sum()
            p = z + (rz_next / rz) * p
            rz = rz_next
    out = torch.where(free, ref + D, start)
    loss = float(quadratic_loss(out - ref, G, A))
    start_loss = float(quadratic_loss(W32 - ref, G, A)) if reference is not None else 0.0
    return MaskedSolution(out.to(W.dtype), loss, start_loss, done, res)
