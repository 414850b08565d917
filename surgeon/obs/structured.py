"""Removal of whole rows (output neurons, heads) and columns (input features) under K-FAC curvature.

With F ≈ G ⊗ A for ``vec(W)`` row-major, ``F⁻¹ = Ginv ⊗ Ainv``. Constraining a set R of rows to zero
is OBS with equality constraints whose Schur complement is ``Ginv[R, R] ⊗ Ainv``; its inverse is
``Ginv[R, R]⁻¹ ⊗ A``, so the optimal update and the loss increase factor into small solves:

- rows R:    ``ΔW = −Ginv[:, R] Ginv[R, R]⁻¹ W_R``,        cost ``½ tr(Ginv[R, R]⁻¹ W_R A W_Rᵀ)``
- columns C: ``ΔW = −W[:, C] Ainv[C, C]⁻¹ Ainv[C, :]``,    cost ``½ tr(Ainv[C, C]⁻¹ W[:, C]ᵀ G W[:, C])``

Both are projections in the F metric that act on different Kronecker factors (``W ↦ P W`` and
``W ↦ W Q``), so they commute and their product is the projection onto "rows R and columns C zero":
applying the row update and then the column update is the jointly constrained optimum, and its cost
is the row cost plus the column cost measured on the row-updated weights (Pythagoras in the F metric).

Conventions:
- Numerators take the *undamped* A (resp. G); ``Ginv``/``Ainv`` are damped inverses
  (:func:`surgeon.linalg.damped_inverse`). The functions use whatever they are given.
- Dead rows/columns (zero diagonal of ``Ginv``/``Ainv``) carry no signal: they cost 0, are zeroed
  without compensating anything, and are left out of every solve.
- Computation is in fp32 (fp64 when any input is fp64) on the device of ``W``; results are returned
  in that dtype, the caller casts back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["col_costs", "remove", "remove_cols", "remove_rows", "row_costs"]

Index = Tensor | Sequence[int]


def row_costs(W: Tensor, A: Tensor, Ginv: Tensor, block: int = 1, sets: Tensor | None = None) -> Tensor:
    """Cost of removing each block of ``block`` consecutive rows on its own: ``[R // block]``.

    ``cost_B = ½ tr(Ginv[B, B]⁻¹ W_B A W_Bᵀ)``; for ``block=1`` this is ``½ W_i A W_iᵀ / Ginv_ii``.
    Blocks (e.g. attention heads) are solved in one batched call. ``sets`` (``[n, b]`` row indices)
    prices arbitrary blocks of equal size instead, e.g. one query head of every KV group: ``[n]``.
    """
    R, C = _check(W, A, Ginv, "A", "Ginv")
    dt = _dtype(W, A, Ginv)
    W, A, Ginv = (t.to(device=W.device, dtype=dt) for t in (W, A, Ginv))
    return _block_costs(W, A, Ginv, _sets(R, block, sets, W.device))


def col_costs(W: Tensor, G: Tensor, Ainv: Tensor, block: int = 1, sets: Tensor | None = None) -> Tensor:
    """Cost of removing each block of ``block`` consecutive columns on its own: ``[C // block]``.

    ``cost_B = ½ tr(Ainv[B, B]⁻¹ W[:, B]ᵀ G W[:, B])``: the row formula applied to ``Wᵀ``; ``sets`` as
    in :func:`row_costs`, for columns.
    """
    _check(W.mT, G, Ainv, "G", "Ainv")
    dt = _dtype(W, G, Ainv)
    W, G, Ainv = (t.to(device=W.device, dtype=dt) for t in (W, G, Ainv))
    return _block_costs(W.mT, G, Ainv, _sets(W.shape[1], block, sets, W.device))


def remove_rows(W: Tensor, Ginv: Tensor, rows: Index, A: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Zero the rows ``rows`` jointly and let the other rows compensate optimally.

    Returns ``(W_new, cost)``; ``cost = ½ tr(Ginv[R, R]⁻¹ W_R A W_Rᵀ)`` (None without ``A``).
    ``rows`` is a list/LongTensor of indices or a boolean mask; removed rows are exactly zero.
    """
    R, C = W.shape
    if Ginv.shape != (R, R) or (A is not None and A.shape != (C, C)):
        raise ValueError(f"shapes do not match W {tuple(W.shape)}: Ginv {tuple(Ginv.shape)}")
    dt = _dtype(W, Ginv, *(() if A is None else (A,)))
    W = W.to(dtype=dt)
    Ginv = Ginv.to(device=W.device, dtype=dt)
    idx = _index(rows, R, W.device)
    live = idx[Ginv.diagonal()[idx] > 0]
    cost = W.new_zeros(()) if A is not None else None
    if live.numel():
        W_R = W[live]
        X = _spd_solve(Ginv[live][:, live], W_R)  # Ginv[R, R]⁻¹ W_R
        W_new = torch.addmm(W, Ginv[:, live], X, alpha=-1)
        if A is not None:
            cost = 0.5 * (X * (W_R @ A.to(device=W.device, dtype=dt))).sum()
    else:
        W_new = W.clone()
    W_new[idx] = 0
    return W_new, cost


def remove_cols(W: Tensor, Ainv: Tensor, cols: Index, G: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Zero the columns ``cols`` jointly and let the other columns compensate optimally.

    Returns ``(W_new, cost)``; ``cost = ½ tr(Ainv[C, C]⁻¹ W[:, C]ᵀ G W[:, C])`` (None without ``G``).
    """
    Wt, cost = remove_rows(W.mT, Ainv, cols, G)
    return Wt.mT.contiguous(), cost


def remove(
    W: Tensor,
    Ginv: Tensor,
    Ainv: Tensor,
    rows: Index = (),
    cols: Index = (),
    A: Tensor | None = None,
    G: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Remove rows and columns in one shot: the optimum under both constraint sets.

    The row update, then the column update of the row-updated weights (they commute). The cost is
    returned when both ``A`` and ``G`` are given.
    """
    W1, c_rows = remove_rows(W, Ginv, rows, A)
    W2, c_cols = remove_cols(W1, Ainv, cols, G)
    W2[_index(rows, W.shape[0], W2.device)] = 0
    cost = c_rows + c_cols if c_rows is not None and c_cols is not None else None
    return W2, cost


# -- helpers --------------------------------------------------------------------------------------------


def _check(W: Tensor, N: Tensor, Pinv: Tensor, n_name: str, p_name: str) -> tuple[int, int]:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    R, C = W.shape
    if N.shape != (C, C) or Pinv.shape != (R, R):
        raise ValueError(
            f"shapes do not match W {tuple(W.shape)}: {n_name} {tuple(N.shape)}, {p_name} {tuple(Pinv.shape)}"
        )
    return R, C


def _dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _index(sel: Index, n: int, device: torch.device) -> Tensor:
    """Sorted unique LongTensor of indices from a list, LongTensor or boolean mask."""
    idx = torch.as_tensor(sel, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"boolean mask has shape {tuple(idx.shape)}, expected ({n},)")
        return idx.nonzero().squeeze(1)
    idx = idx.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"index out of range for size {n}")
    return torch.unique(idx)


def _sets(n: int, block: int, sets: Tensor | None, device: torch.device) -> Tensor:
    """``[n_sets, size]`` indices: consecutive blocks of ``block``, or the given ``sets`` checked."""
    if sets is None:
        if block < 1 or n % block:
            raise ValueError(f"block {block} does not divide the {n} rows")
        return torch.arange(n, device=device).view(n // block, block)
    sets = torch.as_tensor(sets, device=device).long()
    if sets.ndim != 2 or sets.shape[1] < 1:
        raise ValueError(f"sets must be [n, size] with size >= 1, got shape {tuple(sets.shape)}")
    if sets.numel() and (int(sets.min()) < 0 or int(sets.max()) >= n):
        raise IndexError(f"set index out of range for size {n}")
    return sets


def _block_costs(W: Tensor, N: Tensor, Pinv: Tensor, sets: Tensor) -> Tensor:
    """``½ tr(Pinv[B, B]⁻¹ W_B N W_Bᵀ)`` for the row sets B of ``W`` (rows of ``sets``), dead rows excluded."""
    nb, block = sets.shape
    d = Pinv.diagonal()
    WN = W @ N
    if block == 1:
        num = (WN * W).sum(1)[sets[:, 0]]
        dd = d[sets[:, 0]]
        return torch.where(dd > 0, 0.5 * num / torch.where(dd > 0, dd, 1), 0)
    M = torch.bmm(WN[sets], W[sets].mT)  # W_B N W_Bᵀ
    S = Pinv[sets[:, :, None], sets[:, None, :]]  # Pinv[B, B]
    live = d[sets] > 0
    both = live.unsqueeze(2) & live.unsqueeze(1)
    # tr(S_LL⁻¹ M_LL) over the live subset L of each block, batched: dead entries become an
    # identity block of S and a zero block of M, which adds nothing to the trace.
    eye = torch.diag_embed((~live).to(S.dtype))
    S = torch.where(both, S, 0) + eye
    M = torch.where(both, M, 0)
    return 0.5 * _spd_solve(S, M).diagonal(dim1=-2, dim2=-1).sum(-1)


def _spd_solve(S: Tensor, B: Tensor) -> Tensor:
    """``S⁻¹ B`` for symmetric positive definite ``S`` (batched); LU when Cholesky fails in floating point."""
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info == 0).all()):
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(S, B)
