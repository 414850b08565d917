"""Structured OBS closed forms against the explicit Fisher ``F = G ⊗ A`` and its dense OBS solution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from surgeon.linalg import add_damping, damped_inverse
from surgeon.obs.structured import col_costs, remove, remove_cols, remove_rows, row_costs

DT = torch.float64
dims = st.integers(2, 8)
seeds = st.integers(0, 2**31 - 1)


def spd(n: int, gen: torch.Generator, rank: int | None = None, jitter: float = 0.1) -> torch.Tensor:
    X = torch.randn(n, rank or n + 2, generator=gen, dtype=DT)
    return X @ X.T / X.shape[1] + jitter * torch.eye(n, dtype=DT)


def problem(R: int, C: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(R, C, generator=gen, dtype=DT), spd(R, gen), spd(C, gen)


def dense_obs(W: torch.Tensor, F: torch.Tensor, Q: torch.Tensor):
    """Explicit OBS with equality constraints ``w_Q = 0``: the update δ and the cost."""
    w = W.reshape(-1)
    Finv = torch.linalg.inv(F)
    lam = torch.linalg.solve(Finv[Q][:, Q], w[Q])
    delta = -Finv[:, Q] @ lam
    return delta, 0.5 * w[Q] @ lam


def entries(R: int, C: int, rows=(), cols=()) -> torch.Tensor:
    """Indices into row-major ``vec(W)`` of the given whole rows and columns."""
    mask = torch.zeros(R, C, dtype=torch.bool)
    mask[list(rows)] = True
    mask[:, list(cols)] = True
    return mask.reshape(-1).nonzero().squeeze(1)


def subset(data, n: int, min_size: int = 1):
    return sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=min_size, max_size=n, unique=True)))


def check_removal(W, W_new, cost, F, Q):
    delta, ref_cost = dense_obs(W, F, Q)
    torch.testing.assert_close(W_new.reshape(-1), W.reshape(-1) + delta, rtol=1e-7, atol=1e-9)
    assert (W_new.reshape(-1)[Q] == 0).all()
    torch.testing.assert_close(cost, ref_cost, rtol=1e-7, atol=1e-10)
    d = W_new.reshape(-1) - W.reshape(-1)
    torch.testing.assert_close(cost, 0.5 * d @ F @ d, rtol=1e-7, atol=1e-10)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_row_block_costs_match_dense(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    block = data.draw(st.sampled_from([b for b in range(1, R + 1) if R % b == 0]))
    costs = row_costs(W, A, torch.linalg.inv(G), block=block)
    F = torch.kron(G, A)
    ref = [dense_obs(W, F, entries(R, C, rows=range(k * block, (k + 1) * block)))[1] for k in range(R // block)]
    torch.testing.assert_close(costs, torch.stack(ref), rtol=1e-7, atol=1e-10)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_col_block_costs_match_dense(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    block = data.draw(st.sampled_from([b for b in range(1, C + 1) if C % b == 0]))
    costs = col_costs(W, G, torch.linalg.inv(A), block=block)
    F = torch.kron(G, A)
    ref = [dense_obs(W, F, entries(R, C, cols=range(k * block, (k + 1) * block)))[1] for k in range(C // block)]
    torch.testing.assert_close(costs, torch.stack(ref), rtol=1e-7, atol=1e-10)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_remove_row_set_matches_dense(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    rows = subset(data, R)
    W_new, cost = remove_rows(W, torch.linalg.inv(G), rows, A)
    check_removal(W, W_new, cost, torch.kron(G, A), entries(R, C, rows=rows))


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_remove_col_set_matches_dense(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    cols = subset(data, C)
    W_new, cost = remove_cols(W, torch.linalg.inv(A), cols, G)
    check_removal(W, W_new, cost, torch.kron(G, A), entries(R, C, cols=cols))


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_joint_rows_and_cols_is_the_joint_optimum(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    rows, cols = subset(data, R, 0), subset(data, C, 0)
    W_new, cost = remove(W, Ginv, Ainv, rows, cols, A, G)
    check_removal(W, W_new, cost, torch.kron(G, A), entries(R, C, rows, cols))
    # The two projections commute: columns first gives the same weights.
    W_cols, _ = remove_cols(W, Ainv, cols)
    W_swapped, _ = remove_rows(W_cols, Ginv, rows)
    torch.testing.assert_close(W_swapped, W_new, rtol=1e-7, atol=1e-9)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_single_row_and_column_closed_forms(R, C, seed, data):
    """The per-structure formulas of the design: ½ W_i A W_iᵀ / Ginv_ii and its column twin."""
    W, G, A = problem(R, C, seed)
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    i, j = data.draw(st.integers(0, R - 1)), data.draw(st.integers(0, C - 1))
    rc, cc = row_costs(W, A, Ginv), col_costs(W, G, Ainv)
    torch.testing.assert_close(rc[i], 0.5 * W[i] @ A @ W[i] / Ginv[i, i])
    torch.testing.assert_close(cc[j], 0.5 * W[:, j] @ G @ W[:, j] / Ainv[j, j])
    W_new, cost = remove_rows(W, Ginv, [i], A)
    torch.testing.assert_close(cost, rc[i])
    torch.testing.assert_close(W_new, W - torch.outer(Ginv[:, i], W[i]) / Ginv[i, i], rtol=1e-7, atol=1e-9)


def dead_problem(R: int, C: int, seed: int, data):
    """Rank-deficient G and A with dead rows/columns, as few calibration tokens and dead inputs give."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=gen, dtype=DT)
    G = spd(R, gen, rank=data.draw(st.integers(1, R)), jitter=0.0)
    A = spd(C, gen, rank=data.draw(st.integers(1, C)), jitter=0.0)
    dead_r = subset(data, R, 0)[: R - 1]
    dead_c = subset(data, C, 0)[: C - 1]
    G[dead_r] = 0
    G[:, dead_r] = 0
    A[dead_c] = 0
    A[:, dead_c] = 0
    return W, G, A, dead_r, dead_c


@given(R=dims, C=dims, seed=seeds, damp=st.sampled_from([1e-3, 0.01, 0.1]), data=st.data())
def test_dead_and_rank_deficient_match_live_dense(R, C, seed, damp, data):
    """With damping and dead rows/columns, closed forms equal dense OBS on the live sub-problem."""
    W, G, A, dead_r, dead_c = dead_problem(R, C, seed, data)
    Ginv, Ainv = damped_inverse(G, damp), damped_inverse(A, damp)
    live_r = torch.tensor([i for i in range(R) if i not in dead_r])
    live_c = torch.tensor([j for j in range(C) if j not in dead_c])
    Gd = torch.zeros_like(G)
    Ad = torch.zeros_like(A)
    Gd[live_r[:, None], live_r] = add_damping(G[live_r][:, live_r], damp)
    Ad[live_c[:, None], live_c] = add_damping(A[live_c][:, live_c], damp)
    Wl = W[live_r][:, live_c]
    F = torch.kron(Gd[live_r][:, live_r], Ad[live_c][:, live_c])
    rows, cols = subset(data, R, 0), subset(data, C, 0)
    lr = [k for k, i in enumerate(live_r.tolist()) if i in rows]
    lc = [k for k, j in enumerate(live_c.tolist()) if j in cols]

    # Dead structures cost nothing.
    assert (row_costs(W, A, Ginv)[dead_r] == 0).all()
    assert (col_costs(W, G, Ainv)[dead_c] == 0).all()
    # Single-row costs (damped numerator) equal the dense ones on live rows.
    rc = row_costs(W, Ad, Ginv)
    for k, i in enumerate(live_r.tolist()):
        ref = dense_obs(Wl, F, entries(len(live_r), len(live_c), rows=[k]))[1]
        torch.testing.assert_close(rc[i], ref, rtol=1e-6, atol=1e-9)

    W_new, cost = remove(W, Ginv, Ainv, rows, cols, Ad, Gd)
    assert (W_new[rows] == 0).all() and (W_new[:, cols] == 0).all()
    Q = entries(len(live_r), len(live_c), lr, lc)
    if Q.numel():
        check_removal(Wl, W_new[live_r][:, live_c], cost, F, Q)
    else:
        assert cost == 0
    # Dead rows of G never move to compensate removed rows (the row update has no component there).
    W_rows, _ = remove_rows(W, Ginv, rows)
    untouched = [i for i in dead_r if i not in rows]
    assert torch.equal(W_rows[untouched], W[untouched])


def test_row_blocks_with_a_dead_row_solve_on_the_live_subset():
    gen = torch.Generator().manual_seed(3)
    W, G, A = torch.randn(6, 5, generator=gen, dtype=DT), spd(6, gen), spd(5, gen)
    G[4] = 0
    G[:, 4] = 0
    Ginv = damped_inverse(G, 0.0)
    costs = row_costs(W, A, Ginv, block=3)
    live = [3, 5]
    S = Ginv[live][:, live]
    ref = 0.5 * torch.trace(torch.linalg.solve(S, W[live] @ A @ W[live].T))
    torch.testing.assert_close(costs[1], ref)
    W_new, cost = remove_rows(W, Ginv, [3, 4, 5], A)
    torch.testing.assert_close(cost, costs[1])
    assert (W_new[3:] == 0).all()


def test_dtypes_and_index_forms():
    W, G, A = problem(4, 6, 0)
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    # bf16/fp16 weights are computed and returned in fp32; fp64 stays fp64.
    out, cost = remove_rows(W.bfloat16(), Ginv.float(), [1], A.float())
    assert out.dtype == torch.float32 and cost.dtype == torch.float32
    assert row_costs(W.half(), A.float(), Ginv.float()).dtype == torch.float32
    assert remove_rows(W, Ginv, [1])[0].dtype == torch.float64
    # Boolean masks, tensors and duplicates select the same set; the input is never modified.
    W0 = W.clone()
    a = remove_rows(W, Ginv, torch.tensor([False, True, False, True]), A)
    b = remove_rows(W, Ginv, [3, 1, 3], A)
    torch.testing.assert_close(a, b)
    assert torch.equal(W, W0)
    # Nothing to remove: unchanged, zero cost; no A: no cost.
    same, zero = remove(W, Ginv, Ainv, [], [], A, G)
    assert torch.equal(same, W) and zero == 0
    assert remove_cols(W, Ainv, [0])[1] is None
    with pytest.raises(ValueError):
        row_costs(W, A, Ginv, block=3)
    with pytest.raises(IndexError):
        remove_rows(W, Ginv, [4])
    with pytest.raises(ValueError):
        col_costs(W, A, Ginv)


def test_many_rows_vectorised():
    """Thousands of single rows are costed without a Python loop (fast even on CPU)."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(4096, 64, generator=gen)
    A = spd(64, gen).float()
    Ginv = spd(4096, gen, rank=64, jitter=1.0).float()  # any SPD matrix stands in for a damped inverse
    costs = row_costs(W, A, Ginv)
    assert costs.shape == (4096,) and bool((costs > 0).all())
    torch.testing.assert_close(costs[17], 0.5 * W[17] @ A @ W[17] / Ginv[17, 17])
    blocks = row_costs(W, A, Ginv, block=64)
    assert blocks.shape == (64,) and bool((blocks > 0).all())


def equal_sets(data, n: int) -> torch.Tensor:
    """A random partition of ``range(n)`` into sets of one size (e.g. one query head of every KV group)."""
    size = data.draw(st.sampled_from([b for b in range(1, n + 1) if n % b == 0]))
    perm = torch.as_tensor(data.draw(st.permutations(range(n))))
    return perm.view(n // size, size)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_costs_of_arbitrary_index_sets_match_dense(R, C, seed, data):
    """Rows (columns) that are not consecutive, priced as one structure: the dense OBS cost of each set."""
    W, G, A = problem(R, C, seed)
    F = torch.kron(G, A)
    rs, cs = equal_sets(data, R), equal_sets(data, C)
    rc = row_costs(W, A, torch.linalg.inv(G), sets=rs)
    cc = col_costs(W, G, torch.linalg.inv(A), sets=cs)
    torch.testing.assert_close(rc, torch.stack([dense_obs(W, F, entries(R, C, rows=s.tolist()))[1] for s in rs]),
                               rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(cc, torch.stack([dense_obs(W, F, entries(R, C, cols=s.tolist()))[1] for s in cs]),
                               rtol=1e-7, atol=1e-10)


@given(R=dims, C=dims, seed=seeds, data=st.data())
def test_consecutive_sets_equal_blocks(R, C, seed, data):
    W, G, A = problem(R, C, seed)
    block = data.draw(st.sampled_from([b for b in range(1, R + 1) if R % b == 0]))
    Ginv = torch.linalg.inv(G)
    torch.testing.assert_close(row_costs(W, A, Ginv, block=block),
                               row_costs(W, A, Ginv, sets=torch.arange(R).view(-1, block)), rtol=0, atol=0)


@given(R=dims, C=st.integers(2, 8), seed=seeds, data=st.data())
def test_column_update_is_the_least_squares_optimum(R, C, seed, data):
    """Removing input columns C of a linear with the A⁻¹ update is the layer's least-squares optimum:
    ``min ‖X W₀ᵀ − X Wᵀ‖²`` over W with ``W[:, C] = 0``, whatever G (the output side is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    N = C + data.draw(st.integers(1, 8))
    X = torch.randn(N, C, generator=gen, dtype=DT)
    W = torch.randn(R, C, generator=gen, dtype=DT)
    cols = subset(data, C)[: C - 1]
    keep = [j for j in range(C) if j not in cols]
    W_new, _ = remove_cols(W, torch.linalg.inv(X.T @ X / N), cols)
    ref = torch.zeros_like(W)
    ref[:, keep] = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(W_new, ref, rtol=1e-6, atol=1e-8)


def test_bad_sets_are_refused():
    W, G, A = problem(4, 6, 0)
    Ginv = torch.linalg.inv(G)
    with pytest.raises(IndexError, match="out of range"):
        row_costs(W, A, Ginv, sets=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"\[n, size\]"):
        row_costs(W, A, Ginv, sets=torch.tensor([0, 1]))
