"""Kronecker-factored unstructured/N:M OBS against a dense reference with the explicit F = G ⊗ A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.obs import unstructured as U
from surgeon.obs.unstructured import (
    masked_costs,
    nm_candidates,
    nm_select,
    prune_weights,
    weight_costs,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------
# Problem generation and the dense reference (numpy, float64)


def spd(rng: np.random.Generator, n: int) -> np.ndarray:
    X = rng.normal(size=(n, n + 2))
    return X @ X.T / (n + 2) + 0.3 * np.eye(n)


def problem(seed: int, R: int, C: int, p: float):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(R, C))
    G, A = spd(rng, R), spd(rng, C)
    Q = rng.random((R, C)) < p
    return W, G, A, Q


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def obs_dense(w: np.ndarray, F: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """δ = −F⁻¹E_Q(E_QᵀF⁻¹E_Q)⁻¹E_Qᵀw and λ for flat indices q."""
    Finv = np.linalg.inv(F)
    if q.size == 0:
        return np.zeros_like(w), np.zeros(0)
    lam = np.linalg.solve(Finv[np.ix_(q, q)], w[q])
    return -Finv[:, q] @ lam, lam


def chunked_dense(W, F, Q, chunk):
    """The same sequence of exact solves on the dense problem: chunk by chunk, row-major."""
    w = W.reshape(-1).copy()
    q_all = np.flatnonzero(Q.reshape(-1))
    cost = 0.0
    for s in range(0, q_all.size, chunk):
        q = q_all[s : s + chunk]
        delta, lam = obs_dense(w, F, q)
        cost += 0.5 * w[q] @ lam
        w = w + delta
        w[q] = 0.0
    w[q_all] = 0.0
    return w.reshape(W.shape), cost


dims = st.integers(2, 6)
seeds = st.integers(0, 2**32 - 1)
fractions = st.floats(0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Costs


@SETTINGS
@given(seed=seeds, R=dims, C=dims)
def test_weight_costs_match_dense_inverse(seed, R, C):
    W, G, A, _ = problem(seed, R, C, 0.5)
    Ginv, Ainv = np.linalg.inv(G), np.linalg.inv(A)
    Finv = np.linalg.inv(np.kron(G, A))
    expected = 0.5 * W.reshape(-1) ** 2 / np.diag(Finv)
    got = weight_costs(t(W), t(Ginv), t(Ainv))
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, rtol=1e-9)
    # the diagonals alone give the same
    got_diag = weight_costs(t(W), t(np.diag(Ginv)), t(np.diag(Ainv)))
    np.testing.assert_array_equal(got_diag.numpy(), got.numpy())


def test_weight_costs_dead_rows_and_columns_cost_zero():
    W = torch.randn(3, 4)
    Ginv = torch.diag(torch.tensor([1.0, 0.0, 2.0]))
    Ainv = torch.diag(torch.tensor([1.0, 1.0, 0.0, 3.0]))
    c = weight_costs(W, Ginv, Ainv)
    assert torch.isfinite(c).all()
    assert (c[1] == 0).all() and (c[:, 2] == 0).all()
    assert c.dtype == torch.float32


def test_masked_costs():
    c = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    keep = torch.tensor([[True, False], [False, True]])
    out = masked_costs(c, keep)
    assert out.tolist() == [[1.0, float("-inf")], [float("-inf"), 4.0]]
    with pytest.raises(TypeError):
        masked_costs(c, keep.float())


# ------------------------------------------------------------------------------------------
# Updates


@SETTINGS
@given(seed=seeds, R=dims, C=dims, p=fractions)
def test_full_one_chunk_is_exact_obs(seed, R, C, p):
    W, G, A, Q = problem(seed, R, C, p)
    F = np.kron(G, A)
    q = np.flatnonzero(Q.reshape(-1))
    delta, _ = obs_dense(W.reshape(-1), F, q)
    W_new, cost = prune_weights(
        t(W), t(Q), t(np.linalg.inv(G)), t(np.linalg.inv(A)), correlation="full", max_correlate=R * C
    )
    expected = W.reshape(-1) + delta
    expected[q] = 0.0
    np.testing.assert_allclose(W_new.numpy().reshape(-1), expected, rtol=1e-8, atol=1e-9)
    assert (W_new.numpy()[Q] == 0).all()
    np.testing.assert_allclose(cost, 0.5 * delta @ F @ delta, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(seed=seeds, R=dims, C=dims, p=fractions, chunk=st.integers(1, 5))
def test_full_chunked_equals_sequential_dense_solves(seed, R, C, p, chunk):
    W, G, A, Q = problem(seed, R, C, p)
    expected, expected_cost = chunked_dense(W, np.kron(G, A), Q, chunk)
    W_new, cost = prune_weights(
        t(W), t(Q), t(np.linalg.inv(G)), t(np.linalg.inv(A)), correlation="full", max_correlate=chunk
    )
    np.testing.assert_allclose(W_new.numpy(), expected, rtol=1e-8, atol=1e-9)
    assert (W_new.numpy()[Q] == 0).all()
    np.testing.assert_allclose(cost, expected_cost, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(seed=seeds, R=dims, C=dims, p=fractions)
def test_row_is_exact_obs_for_diagonal_G(seed, R, C, p):
    W, G, A, Q = problem(seed, R, C, p)
    Ginv = np.linalg.inv(G)  # full, non-diagonal: "row" must use only its diagonal
    W_new, cost = prune_weights(t(W), t(Q), t(Ginv), t(np.linalg.inv(A)), correlation="row")
    q = np.flatnonzero(Q.reshape(-1))
    # The update is the optimum for F = D ⊗ A with any positive diagonal D, e.g. the identity ...
    delta, _ = obs_dense(W.reshape(-1), np.kron(np.eye(R), A), q)
    expected = W.reshape(-1) + delta
    expected[q] = 0.0
    np.testing.assert_allclose(W_new.numpy().reshape(-1), expected, rtol=1e-8, atol=1e-9)
    # ... and the estimate is its cost for D = diag(1 / Ginv_ii), the model of the per-weight costs.
    F_diag = np.kron(np.diag(1.0 / np.diag(Ginv)), A)
    np.testing.assert_allclose(cost, 0.5 * delta @ F_diag @ delta, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(seed=seeds, R=dims, C=dims, p=fractions)
def test_none_only_zeroes(seed, R, C, p):
    W, G, A, Q = problem(seed, R, C, p)
    Ginv, Ainv = t(np.linalg.inv(G)), t(np.linalg.inv(A))
    W_new, cost = prune_weights(t(W), t(Q), Ginv, Ainv, correlation="none")
    np.testing.assert_array_equal(W_new.numpy(), np.where(Q, 0.0, W))
    np.testing.assert_allclose(cost, weight_costs(t(W), Ginv, Ainv).numpy()[Q].sum(), rtol=1e-12)


@SETTINGS
@given(seed=seeds, R=dims, C=dims, p=fractions, correlation=st.sampled_from(["row", "full"]))
def test_earlier_removals_stay_zero(seed, R, C, p, correlation):
    W, G, A, Q = problem(seed, R, C, p)
    old = np.random.default_rng(seed + 1).random((R, C)) < 0.3
    W = np.where(old, 0.0, W)
    keep = t(~old)
    W_new, _ = prune_weights(
        t(W), t(Q & ~old), t(np.linalg.inv(G)), t(np.linalg.inv(A)),
        correlation=correlation, max_correlate=3, keep_mask=keep,
    )
    assert (W_new.numpy()[Q | old] == 0).all()


@SETTINGS
@given(seed=seeds, R=st.integers(3, 6), C=st.integers(3, 6), p=fractions)
def test_dead_rows_and_columns(seed, R, C, p):
    """Dead weights are zeroed uncompensated; the live sub-problem is solved exactly."""
    W, G, A, Q = problem(seed, R, C, p)
    rng = np.random.default_rng(seed + 2)
    live_r = rng.random(R) < 0.7
    live_c = rng.random(C) < 0.7
    live_r[0] = live_c[0] = True
    Ginv = np.zeros((R, R))
    Ginv[np.ix_(live_r, live_r)] = np.linalg.inv(G[np.ix_(live_r, live_r)])
    Ainv = np.zeros((C, C))
    Ainv[np.ix_(live_c, live_c)] = np.linalg.inv(A[np.ix_(live_c, live_c)])

    expected = np.where(Q, 0.0, W)
    sub = np.ix_(live_r, live_c)
    Ws, Qs = W[sub], Q[sub]
    qs = np.flatnonzero(Qs.reshape(-1))
    Fs = np.kron(G[np.ix_(live_r, live_r)], A[np.ix_(live_c, live_c)])
    delta, _ = obs_dense(Ws.reshape(-1), Fs, qs)
    ws = Ws.reshape(-1) + delta
    ws[qs] = 0.0
    expected[sub] = ws.reshape(Ws.shape)

    W_new, cost = prune_weights(t(W), t(Q), t(Ginv), t(Ainv), correlation="full")
    np.testing.assert_allclose(W_new.numpy(), expected, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(cost, 0.5 * delta @ Fs @ delta, rtol=1e-8, atol=1e-12)
    for correlation in ("none", "row"):
        W_new, cost = prune_weights(t(W), t(Q), t(Ginv), t(Ainv), correlation=correlation)
        assert np.isfinite(cost)
        assert (W_new.numpy()[Q] == 0).all()
        dead = ~(live_r[:, None] & live_c[None, :])
        np.testing.assert_array_equal(W_new.numpy()[dead & ~Q], W[dead & ~Q])


def test_row_batches_agree_with_one_batch(monkeypatch):
    """Rows of very different removal counts split into several padded batches give the same result."""
    rng = np.random.default_rng(0)
    R, C = 40, 12
    W, G, A = rng.normal(size=(R, C)), spd(rng, R), spd(rng, C)
    Q = rng.random((R, C)) < rng.random((R, 1))  # per-row removal rates from 0 to 1
    args = (t(W), t(Q), t(np.linalg.inv(G)), t(np.linalg.inv(A)))
    one, cost_one = prune_weights(*args, correlation="row")
    monkeypatch.setattr(U, "_ROW_BATCH_ELEMENTS", 150)
    many, cost_many = prune_weights(*args, correlation="row")
    np.testing.assert_allclose(many.numpy(), one.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cost_many, cost_one, rtol=1e-10)


@pytest.mark.parametrize("correlation", ["none", "row", "full"])
def test_fp32_and_low_precision_inputs(correlation):
    rng = np.random.default_rng(1)
    R, C = 24, 16
    W, G, A = rng.normal(size=(R, C)), spd(rng, R), spd(rng, C)
    Q = rng.random((R, C)) < 0.5
    Ginv, Ainv = np.linalg.inv(G), np.linalg.inv(A)
    ref, ref_cost = prune_weights(t(W), t(Q), t(Ginv), t(Ainv), correlation=correlation)
    f32 = [t(x).float() for x in (W, Ginv, Ainv)]
    out, cost = prune_weights(f32[0], t(Q), f32[1], f32[2], correlation=correlation)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-4)
    out16, _ = prune_weights(f32[0].bfloat16(), t(Q), f32[1], f32[2], correlation=correlation)
    assert out16.dtype == torch.bfloat16 and (out16[t(Q)] == 0).all()


def test_singular_system_gets_jitter(caplog):
    """Two identical columns of Ainv make the joint system singular; jitter keeps it solvable."""
    W = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    Ainv = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    remove = torch.tensor([[True, True, False]])
    with caplog.at_level("WARNING", logger=U.__name__):
        out, cost = prune_weights(W, remove, torch.eye(1, dtype=torch.float64), Ainv)
    assert "jitter" in caplog.text
    assert torch.isfinite(out).all() and np.isfinite(cost)
    assert out[0, :2].eq(0).all()


def test_nothing_removed_leaves_W_unchanged():
    W = torch.randn(3, 4)
    for correlation in ("none", "row", "full"):
        out, cost = prune_weights(W, torch.zeros(3, 4, dtype=torch.bool), torch.eye(3), torch.eye(4),
                                  correlation=correlation)
        assert torch.equal(out, W) and cost == 0.0


def test_prune_weights_errors():
    W, Q = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="correlation"):
        prune_weights(W, Q, torch.eye(3), torch.eye(4), correlation="block")
    with pytest.raises(ValueError, match="max_correlate"):
        prune_weights(W, Q, torch.eye(3), torch.eye(4), max_correlate=0)
    with pytest.raises(ValueError, match="Ginv"):
        prune_weights(W, Q, torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="Ginv"):
        prune_weights(W, Q, torch.ones(3), torch.eye(4), correlation="full")
    with pytest.raises(TypeError, match="remove"):
        prune_weights(W, Q.float(), torch.eye(3), torch.eye(4))


# ------------------------------------------------------------------------------------------
# N:M


def nm_reference(costs: np.ndarray, n: int, m: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Per group: order by (kept first, cost descending, column ascending), keep the first n."""
    R, C = costs.shape
    out = np.zeros((R, C), dtype=bool)
    for r in range(R):
        for g0 in range(0, C, m):
            cols = range(g0, g0 + m)
            key = lambda j: (0 if keep is None or keep[r, j] else 1, -costs[r, j], j)  # noqa: E731
            for j in sorted(cols, key=key)[:n]:
                out[r, j] = True
    return out


@st.composite
def nm_problem(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    R = draw(st.integers(1, 5))
    G = draw(st.integers(1, 4))
    values = st.sampled_from([0.0, -0.0, 1.0, 2.0, 0.5, float("inf"), float("-inf")]) | st.floats(
        0.0, 10.0, width=32
    )
    costs = np.array(draw(st.lists(values, min_size=R * G * m, max_size=R * G * m)), dtype=np.float32)
    return costs.reshape(R, G * m), n, m


@settings(max_examples=200, deadline=None)
@given(nm_problem())
def test_nm_select_matches_reference(args):
    costs, n, m = args
    keep = nm_select(torch.from_numpy(costs), n, m)
    assert keep.dtype == torch.bool
    assert (keep.numpy().reshape(costs.shape[0], -1, m).sum(-1) == n).all()
    np.testing.assert_array_equal(keep.numpy(), nm_reference(costs, n, m))


@settings(max_examples=200, deadline=None)
@given(nm_problem(), seeds)
def test_nm_select_with_mask_ranks_removed_last(args, seed):
    costs, n, m = args
    kept = np.random.default_rng(seed).random(costs.shape) < 0.6
    keep = nm_select(torch.from_numpy(costs), n, m, keep_mask=torch.from_numpy(kept))
    np.testing.assert_array_equal(keep.numpy(), nm_reference(costs, n, m, kept))


@settings(max_examples=200, deadline=None)
@given(nm_problem(), seeds, st.floats(0.0, 10.0))
def test_nm_candidates_never_break_the_pattern(args, seed, threshold):
    costs, n, m = args
    costs = np.minimum(np.abs(costs), 1e30).astype(np.float32)  # removal costs: finite, >= 0
    rng = np.random.default_rng(seed)
    R, C = costs.shape
    # an existing mask that respects the pattern: each group already lost 0..m-n weights
    kept = np.ones((R, C), dtype=bool)
    for r in range(R):
        for g0 in range(0, C, m):
            lost = rng.choice(m, size=rng.integers(0, m - n + 1), replace=False)
            kept[r, g0 + lost] = False
    cand = nm_candidates(torch.from_numpy(costs), torch.from_numpy(kept), n, m).numpy()
    assert (cand[~kept] == -np.inf).all()
    allowed = kept & (cand != np.inf)
    budget = (m - n) - (~kept).reshape(R, -1, m).sum(-1)
    assert (allowed.reshape(R, -1, m).sum(-1) == budget).all()
    np.testing.assert_array_equal(allowed, kept & ~nm_reference(costs, n, m, kept))
    # any intermediate threshold keeps the pattern reachable, and the final completion is exact
    new_keep = kept & ~(cand <= threshold)
    assert ((~new_keep).reshape(R, -1, m).sum(-1) <= m - n).all()
    final = nm_select(torch.from_numpy(costs), n, m, keep_mask=torch.from_numpy(new_keep)).numpy()
    assert (final.reshape(R, -1, m).sum(-1) == n).all()
    assert not (final & ~new_keep).any()


def test_nm_errors():
    c = torch.rand(2, 8)
    for n, m in [(0, 4), (4, 4), (5, 4), (-1, 4)]:
        with pytest.raises(ValueError, match="0 < N < M"):
            nm_select(c, n, m)
    with pytest.raises(ValueError, match="divisible"):
        nm_select(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        nm_select(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]), 2, 4)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :3] = False
    with pytest.raises(ValueError, match="already removes more"):
        nm_candidates(c, keep, 2, 4)


def test_nm_select_empty():
    assert nm_select(torch.zeros(0, 8), 2, 4).shape == (0, 8)
