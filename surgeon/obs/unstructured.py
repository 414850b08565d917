"""Removal of individual weights (unstructured and N:M) under Kronecker-factored curvature.

With F ≈ G ⊗ A for ``vec(W)`` row-major, ``F⁻¹ = G⁻¹ ⊗ A⁻¹``: the inverse-curvature entry between
weights (i, j) and (k, l) is ``Ginv[i, k] * Ainv[j, l]``. Every cost and update here is built from
such products, so nothing of size (RC)×(RC) is ever formed.

Removing a set Q (``W_Q → 0``) while the remaining weights move optimally is OBS with equality
constraints: ``S = F⁻¹[Q, Q]``, ``λ = S⁻¹ w_Q``, ``ΔW = −Ginv Λ Ainv`` where Λ holds λ at the
positions of Q (zeros elsewhere), and the loss increase is ``½ w_Qᵀ λ``.

Dead rows/columns (zero diagonal of ``Ginv``/``Ainv``, as :func:`surgeon.linalg.damped_inverse`
returns for inputs or outputs that carry no signal) do not affect the modelled loss: their weights
cost 0, are zeroed without compensation, and are left out of every solve (they would make S
singular).

Computation is in fp32 (fp64 when any input is fp64) on the device of ``W``.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CORRELATIONS",
    "masked_costs",
    "nm_candidates",
    "nm_select",
    "prune_weights",
    "weight_costs",
]

CORRELATIONS = ("none", "row", "full")

# Upper bound on elements of the padded (rows × K × K) systems solved together by the "row" level;
# bounds peak memory (a few copies of 2**25 fp32 values ≈ 128 MiB each) while keeping batches large.
_ROW_BATCH_ELEMENTS = 1 << 25


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _diag(M: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Diagonal of an inverse factor, given either as the full matrix or as its diagonal."""
    if M.ndim == 2 and M.shape == (n, n):
        return torch.diagonal(M)
    if M.ndim == 1 and M.shape[0] == n:
        return M
    raise ValueError(f"{name}: expected shape ({n}, {n}) or ({n},), got {tuple(M.shape)}")


def _square(M: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if M.shape != (n, n):
        raise ValueError(f"{name}: expected shape ({n}, {n}), got {tuple(M.shape)}")
    return M


def _bool_mask(mask: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def weight_costs(W: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor) -> torch.Tensor:
    """Loss increase of removing each weight alone: ``½ W_ij² / (Ginv_ii · Ainv_jj)``.

    ``Ginv``/``Ainv`` may be the full inverse factors or just their diagonals. Weights in a dead
    row or column get cost 0: under the model they do not change the loss, so they go first.
    """
    if W.ndim != 2:
        raise ValueError(f"W: expected a matrix, got shape {tuple(W.shape)}")
    R, C = W.shape
    dt = _compute_dtype(W, Ginv, Ainv)
    g = _diag(Ginv, R, "Ginv").to(device=W.device, dtype=dt)
    a = _diag(Ainv, C, "Ainv").to(device=W.device, dtype=dt)
    denom = g[:, None] * a[None, :]
    live = denom > 0
    return torch.where(live, 0.5 * W.to(dt).square() / torch.where(live, denom, 1.0), 0.0)


def masked_costs(costs: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """Costs with already-removed weights at ``-inf``.

    A global threshold over these counts the earlier removals first, so a shot's target (total
    removed so far) needs no separate bookkeeping and a removed weight is never chosen again.
    """
    _bool_mask(keep_mask, costs.shape, "keep_mask")
    return torch.where(keep_mask, costs, float("-inf"))


# --------------------------------------------------------------------------------------------
# Solving the constrained systems


def _spd_solve(S: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S⁻¹ b`` for (batches of) SPD ``S`` by Cholesky.

    S is a principal sub-matrix of a positive definite ``Ginv ⊗ Ainv`` and so SPD in exact
    arithmetic; when rounding breaks that, a jitter relative to the mean diagonal is added to the
    failing systems only, raised tenfold until the factorisation succeeds.
    """
    L, info = torch.linalg.cholesky_ex(S)
    bad = info != 0
    if bool(bad.any()):
        scale = torch.diagonal(S, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(S.dtype).tiny)
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        for rel in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
            jitter = (rel * scale * bad)[..., None, None] * eye
            L, info = torch.linalg.cholesky_ex(S + jitter)
            if not bool((info != 0).any()):
                logger.warning("OBS system not positive definite; jitter %.0e of mean diagonal", rel)
                break
        else:
            raise ValueError("OBS system is not positive definite even with jitter 1e-2")
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


def _lambdas_full(
    W: torch.Tensor, Q: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor, max_correlate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Λ and cost of the joint solve, in row-major chunks of at most ``max_correlate`` weights.

    Chunks are solved one after the other, each on the weights' values after all earlier chunks'
    updates. Those values are read lazily as ``W − Ginv Λ Ainv`` restricted to the chunk's rows
    (Λ is still zero below them), so a chunk costs O(rows·R·C + rows·C² + k³) instead of the
    O(R·k·C) of applying every chunk's update to the whole matrix; the sum over chunks is about one
    dense product. The result equals applying the chunks' updates in sequence.
    """
    rows, cols = Q.nonzero(as_tuple=True)  # row-major order
    lam_mat = torch.zeros_like(W)
    cost = W.new_zeros(())
    n = rows.numel()
    if n == 0:
        return lam_mat, cost
    starts = list(range(0, n, max_correlate))
    ends = [min(s + max_correlate, n) for s in starts]
    bounds = torch.stack([rows[starts], rows[[e - 1 for e in ends]]], 1).tolist()
    for s, e, (lo, hi) in zip(starts, ends, bounds):
        I, J = rows[s:e], cols[s:e]
        if s == 0:
            current = W[lo : hi + 1]
        else:
            current = W[lo : hi + 1] - (Ginv[lo : hi + 1, : hi + 1] @ lam_mat[: hi + 1]) @ Ainv
        w = current[I - lo, J]
        S = Ginv[I[:, None], I[None, :]] * Ainv[J[:, None], J[None, :]]
        lam = _spd_solve(S, w)
        lam_mat[I, J] = lam
        cost = cost + 0.5 * torch.dot(w, lam)
    return lam_mat, cost


def _lambdas_rows(
    W: torch.Tensor, Q: torch.Tensor, g_diag: torch.Tensor, Ainv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Λ and cost when each row's removals are compensated within the row (exact if G is diagonal).

    Row i solves ``Ainv[J_i, J_i] λ_i = W[i, J_i]``. Rows are sorted by their number of removals
    and cut into batches of similar size under ``_ROW_BATCH_ELEMENTS``; inside a batch every system
    is padded to the batch's largest count with an identity block and a zero right-hand side, so
    padded entries solve to λ = 0 and one batched Cholesky handles the whole batch. The cost uses
    the diagonal model ``G ≈ diag(1 / Ginv_ii)``, matching the per-weight costs.
    """
    R, C = W.shape
    lam_mat = torch.zeros_like(W)
    cost = W.new_zeros(())
    counts = Q.sum(1)
    active = counts.nonzero().squeeze(1)
    if active.numel() == 0:
        return lam_mat, cost
    order = active[torch.argsort(counts[active], stable=True)]
    sorted_counts = counts[order].tolist()
    col_ids = torch.arange(C, device=W.device)
    start, n_rows = 0, len(sorted_counts)
    while start < n_rows:
        end = start + 1
        while end < n_rows and (end + 1 - start) * sorted_counts[end] ** 2 <= _ROW_BATCH_ELEMENTS:
            end += 1
        K = sorted_counts[end - 1]
        rows = order[start:end]
        q = Q[rows]
        # Removed columns first, in column order; the tail beyond each row's count (kept columns)
        # is padding.
        cols = torch.argsort(torch.where(q, col_ids, col_ids + C), dim=1)[:, :K]
        valid = torch.arange(K, device=W.device)[None, :] < counts[rows][:, None]
        S = Ainv[cols[:, :, None], cols[:, None, :]]
        S = torch.where(valid[:, :, None] & valid[:, None, :], S, 0.0)
        S = S + torch.diag_embed((~valid).to(S.dtype))
        w = torch.where(valid, W[rows[:, None], cols], 0.0)
        lam = _spd_solve(S, w)
        # Each row of ``cols`` is a prefix of a permutation: padding points at kept columns and
        # writes their λ = 0, so the scatter has no collisions.
        lam_mat[rows] = torch.zeros_like(q, dtype=W.dtype).scatter_(1, cols, lam)
        cost = cost + 0.5 * ((w * lam).sum(1) / g_diag[rows]).sum()
        start = end
    return lam_mat, cost


def prune_weights(
    W: torch.Tensor,
    remove: torch.Tensor,
    Ginv: torch.Tensor,
    Ainv: torch.Tensor,
    *,
    correlation: str = "full",
    max_correlate: int = 2000,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Zero the weights in ``remove`` and update the rest; returns ``(W_new, estimated loss increase)``.

    ``correlation`` sets how the remaining weights compensate:

    - ``"none"``: no update (OBD-like); the estimate is the sum of :func:`weight_costs`.
    - ``"row"``: each row's removals are compensated by that row's other weights through
      ``Ainv`` only: the exact OBS solution when G is diagonal, and the estimate models G as
      ``diag(1 / Ginv_ii)``. Cheap and parallel over rows; ``Ginv`` may be just its diagonal.
    - ``"full"``: the joint OBS solve over all removals, in row-major chunks of at most
      ``max_correlate`` weights solved in sequence, each seeing the earlier chunks' updates.
      With one chunk this is the exact constrained optimum under G ⊗ A.

    Weights outside ``keep_mask`` (removed in earlier shots) are not solved for; the update may
    move them, and they are set back to zero, as are all of ``remove``, so the returned matrix has
    exact zeros on ``remove | ~keep_mask``. The estimate sums ``½ w_Qᵀ λ`` over the solves (for
    chunks, on the values each chunk saw); it leaves out the chunks' interaction and the
    re-zeroing, so with several chunks it undercounts. ``W`` itself is not modified; ``W_new``
    has its dtype.
    """
    if correlation not in CORRELATIONS:
        raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
    if correlation == "full" and (not isinstance(max_correlate, int) or max_correlate < 1):
        raise ValueError(f"max_correlate must be a positive integer, got {max_correlate!r}")
    if W.ndim != 2:
        raise ValueError(f"W: expected a matrix, got shape {tuple(W.shape)}")
    R, C = W.shape
    _bool_mask(remove, W.shape, "remove")
    remove = remove.to(W.device)
    zero = remove
    if keep_mask is not None:
        zero = remove | ~_bool_mask(keep_mask, W.shape, "keep_mask").to(W.device)

    dt = _compute_dtype(W, Ginv, Ainv)
    W32 = W.to(dt)
    g = _diag(Ginv, R, "Ginv").to(device=W.device, dtype=dt)
    a = _diag(Ainv, C, "Ainv").to(device=W.device, dtype=dt)
    live = (g[:, None] > 0) & (a[None, :] > 0)
    Q = remove & live

    if correlation == "none":
        cost = weight_costs(W32, g, a)[Q].sum()
        out = W32
    elif correlation == "row":
        A = _square(Ainv, C, "Ainv").to(device=W.device, dtype=dt)
        lam_mat, cost = _lambdas_rows(W32, Q, g, A)
        out = W32 - lam_mat @ A
    else:
        G = _square(Ginv, R, "Ginv").to(device=W.device, dtype=dt)
        A = _square(Ainv, C, "Ainv").to(device=W.device, dtype=dt)
        lam_mat, cost = _lambdas_full(W32, Q, G, A, max_correlate)
        out = W32 - (G @ lam_mat) @ A
    out = out.masked_fill(zero, 0.0).to(W.dtype)
    return out, float(cost)


# --------------------------------------------------------------------------------------------
# Semi-structured N:M


def _check_nm(costs: torch.Tensor, n: int, m: int) -> None:
    if costs.ndim != 2:
        raise ValueError(f"costs: expected a matrix, got shape {tuple(costs.shape)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M needs integers 0 < N < M, got {n}:{m}")
    if costs.shape[1] % m:
        raise ValueError(f"N:M with M={m} needs the number of columns ({costs.shape[1]}) divisible by M")
    if bool(torch.isnan(costs).any()):
        raise ValueError("costs contain NaN")


def nm_select(
    costs: torch.Tensor, n: int, m: int, *, keep_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep mask with, in each group of ``m`` consecutive columns of every row, the ``n`` highest costs.

    Ties keep the lower column index; ``-0.0`` equals ``0.0``; ``±inf`` are ordinary values; NaN is
    an error. With ``keep_mask``, weights already removed rank below every kept one (whatever
    their cost), so the result completes an earlier partial pattern: pass the final shot's costs
    and the current mask to get the final N:M mask.
    """
    _check_nm(costs, n, m)
    R, C = costs.shape
    groups = (costs + 0.0).reshape(R, C // m, m)  # + 0.0 turns -0.0 into 0.0 for the sort
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    if keep_mask is not None:
        kept = _bool_mask(keep_mask, costs.shape, "keep_mask").to(costs.device).reshape(R, C // m, m)
        # A stable sort on "removed" after the cost sort orders by (kept, cost desc, index asc).
        removed_sorted = (~kept.gather(-1, order)).to(torch.uint8)
        order = order.gather(-1, torch.sort(removed_sorted, dim=-1, stable=True).indices)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(R, C)


def nm_candidates(costs: torch.Tensor, keep_mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Costs for an intermediate multi-shot threshold that can never break the final N:M pattern.

    Each group may still lose ``m − n − (already removed)`` weights: those that
    :func:`nm_select` would remove now (the group's cheapest kept weights) keep their cost; the
    other kept weights get ``+inf`` and already removed ones ``-inf`` (as in :func:`masked_costs`).
    Any threshold over the result removes at most the allowed number per group, and only weights
    the final completion could also remove.
    """
    _check_nm(costs, n, m)
    keep_mask = _bool_mask(keep_mask, costs.shape, "keep_mask").to(costs.device)
    R, C = costs.shape
    removed = (~keep_mask).reshape(R, C // m, m).sum(-1)
    if bool((removed > m - n).any()):
        raise ValueError(f"keep_mask already removes more than {m - n} weights in some group of {m}")
    final_keep = nm_select(costs, n, m, keep_mask=keep_mask)
    allowed = keep_mask & ~final_keep
    inf = math.inf
    return torch.where(keep_mask, torch.where(allowed, costs, inf), -inf)
