"""Magnitude, Wanda and SparseGPT against slow references, and every method end to end on tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_llama, make_opt
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.adapters import adapter_for
from surgeon.masks import capped_row_mask, matrix_mask, nm_mask, prune_count, row_count_mask, row_mask
from surgeon.methods.admm import AdmmConfig
from surgeon.methods.magnitude import MagnitudeConfig, structure_scores, structured_plan
from surgeon.methods.sparsegpt import SparseGPTConfig, block_prune_counts, sparsegpt_prune
from surgeon.methods.wanda import WandaConfig, wanda_mask, wanda_scores

# -- numpy references ----------------------------------------------------------------------------


def ref_keep_top(s: np.ndarray, keep: int) -> np.ndarray:
    """Keep the ``keep`` highest of a 1-D array; among equal scores the lower index stays."""
    order = np.lexsort((np.arange(s.size), -s))
    out = np.zeros(s.size, dtype=bool)
    out[order[:keep]] = True
    return out


def ref_row_mask(s, sparsity):
    k = int(round(sparsity * s.shape[1]))
    return np.stack([ref_keep_top(r, s.shape[1] - k) for r in s])


def ref_nm_mask(s, n, m):
    g = s.reshape(-1, m)
    return np.stack([ref_keep_top(r, n) for r in g]).reshape(s.shape)


def ref_matrix_mask(s, sparsity):
    k = int(round(sparsity * s.size))
    return ref_keep_top(s.ravel(), s.size - k).reshape(s.shape)


# small integers make many ties, which the tie rule must settle identically
scores_st = st.tuples(st.integers(1, 5), st.sampled_from([4, 8, 12]), st.integers(0, 2**31 - 1), st.booleans())


def _scores(rows, cols, seed, ties):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4, (rows, cols)) if ties else rng.standard_normal((rows, cols))).astype(np.float32)


@given(scores_st, st.floats(0.0, 1.0))
def test_magnitude_masks_match_numpy(shape, sparsity):
    w = _scores(*shape) - 1.5
    a = np.abs(w)
    t = torch.from_numpy(w).abs()
    np.testing.assert_array_equal(matrix_mask(t, sparsity).numpy(), ref_matrix_mask(a, sparsity))
    np.testing.assert_array_equal(row_mask(t, sparsity).numpy(), ref_row_mask(a, sparsity))
    np.testing.assert_array_equal(nm_mask(t, 2, 4).numpy(), ref_nm_mask(a, 2, 4))
    assert int((~matrix_mask(t, sparsity)).sum()) == prune_count(sparsity, w.size)


@given(scores_st, st.integers(-2, 14), st.booleans())
def test_row_count_mask_prunes_a_count_of_every_row(shape, prune, infinite):
    rows, cols, seed, ties = shape
    s = _scores(rows, cols, seed, ties)
    if infinite:  # the N:M shots rank earlier zeros at -inf and forbidden weights at +inf
        s[:, 0], s[:, -1] = -np.inf, np.inf
    k = min(max(prune, 0), cols)
    keep = row_count_mask(torch.from_numpy(s), prune).numpy()
    np.testing.assert_array_equal(keep, np.stack([ref_keep_top(r, cols - k) for r in s]))
    if 0 < k < cols:  # agrees with the sparsity form wherever the rounding lands on the count
        np.testing.assert_array_equal(keep, row_mask(torch.from_numpy(s), k / cols).numpy())


@given(scores_st, st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8)]))
def test_nm_mask_matches_backend(shape, nm):
    backend = pytest.importorskip("surgeon._backend")
    if not hasattr(backend, "nm_mask"):
        pytest.skip("surgeon._backend has no nm_mask")
    rows, cols, seed, ties = shape
    if cols % nm[1]:
        nm = (2, 4)
    s = _scores(rows, cols, seed, ties)
    np.testing.assert_array_equal(nm_mask(torch.from_numpy(s), *nm).numpy(), np.asarray(backend.nm_mask(s, *nm)))


@given(scores_st, st.floats(0.0, 1.0), st.sampled_from([None, (1, 4), (2, 4), (3, 4)]))
def test_wanda_mask_matches_numpy(shape, sparsity, nm):
    rows, cols, seed, ties = shape
    w = _scores(rows, cols, seed, ties) - 1.0
    norms = np.abs(_scores(1, cols, seed + 1, ties)[0])
    ref_scores = np.abs(w) * norms[None, :]
    got = wanda_mask(wanda_scores(torch.from_numpy(w), torch.from_numpy(norms)), sparsity, nm).numpy()
    ref = ref_nm_mask(ref_scores, *nm) if nm else ref_row_mask(ref_scores, sparsity)
    np.testing.assert_array_equal(got, ref)


@given(scores_st, st.sampled_from([(1, 4), (2, 4), (3, 4)]), st.floats(0.0, 1.0))
def test_capped_row_mask_is_the_cheapest_capped_mask(shape, nm, sparsity):
    rows, cols, seed, ties = shape
    s = _scores(rows, cols, seed, ties)
    n, m = nm
    keep = capped_row_mask(torch.from_numpy(s), sparsity, n, m).numpy()
    k = min(int(round(sparsity * cols)), cols // m * (m - n))
    assert ((~keep).sum(1) == k).all()
    assert ((~keep).reshape(rows, -1, m).sum(2) <= m - n).all()
    # optimal: the pruned total equals that of the greedy reference over each row's eligible entries
    eligible = ~ref_nm_mask(s, n, m)
    for r in range(rows):
        best = np.sort(s[r][eligible[r]])[:k].astype(np.float64).sum()  # float64: scores of both signs cancel
        assert s[r][~keep[r]].astype(np.float64).sum() == pytest.approx(best, abs=1e-6 * float(np.abs(s[r]).sum()))
    if k == cols // m * (m - n):
        np.testing.assert_array_equal(keep, ref_nm_mask(s, n, m))


# -- SparseGPT against an explicit OBS sequence --------------------------------------------------


def ref_sparsegpt(W, H, sparsity, nm, blocksize, damp):
    """Column by column OBS with explicit inverse downdates (no Cholesky, no lazy blocks), in float64."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    R, C = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(C)
    live = (~dead).astype(np.float64)
    Hi = np.linalg.inv(H)
    d = np.zeros(C)  # [H_{j:,j:}^-1]_jj: the diagonal of the downdated inverse when column j is reached
    T = Hi.copy()
    for j in range(C):
        d[j] = T[j, j]
        T = T - np.outer(T[:, j], T[j, :]) / T[j, j]
    counts = block_prune_counts(R, C, blocksize, sparsity)
    prune = np.zeros((R, C), dtype=bool)
    for b, i1 in enumerate(range(0, C, blocksize)):
        i2 = min(i1 + blocksize, C)
        if nm is None:
            s = (W[:, i1:i2] ** 2 / d[i1:i2] * live[i1:i2]).ravel()
            prune[:, i1:i2] = ~ref_keep_top(s, s.size - counts[b]).reshape(R, i2 - i1)
        for j in range(i1, i2):
            if nm is not None and j % nm[1] == 0:
                s = W[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]] * live[j:j + nm[1]]
                prune[:, j:j + nm[1]] = ~np.stack([ref_keep_top(r, nm[0]) for r in s])
            for r in np.nonzero(prune[:, j])[0]:
                W[r, j:] -= W[r, j] / Hi[j, j] * Hi[j, j:]
            Hi = Hi - np.outer(Hi[:, j], Hi[j, :]) / Hi[j, j]
    W[prune] = 0.0
    return W, prune


@settings(max_examples=25)
@given(st.integers(1, 6), st.sampled_from([8, 12, 16]), st.sampled_from([4, 8]), st.floats(0.1, 0.9),
       st.sampled_from([None, (2, 4), (1, 4), (4, 8)]), st.integers(0, 2**31 - 1), st.booleans())
def test_sparsegpt_matches_explicit_obs(rows, cols, blocksize, sparsity, nm, seed, with_dead):
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        nm = (2, 4)
    if nm is not None:
        sparsity = 1 - nm[0] / nm[1]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3 * cols, cols)) * rng.uniform(0.2, 2.0, cols)
    if with_dead:
        X[:, rng.choice(cols, 2, replace=False)] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    W = rng.standard_normal((rows, cols))
    got = sparsegpt_prune(torch.from_numpy(W), torch.from_numpy(H), sparsity, nm=nm, blocksize=blocksize,
                          damp=0.01).numpy()
    ref, prune = ref_sparsegpt(W, H, sparsity, nm, blocksize, 0.01)
    np.testing.assert_array_equal(got == 0, prune)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8)
    if nm is None:
        assert int(prune.sum()) == prune_count(sparsity, W.size)
    else:
        assert (prune.reshape(rows, -1, nm[1]).sum(2) == nm[1] - nm[0]).all()


def test_block_prune_counts_sum_exactly():
    for rows, cols, bs, s in [(3, 10, 4, 0.37), (7, 128, 128, 0.5), (5, 300, 128, 0.61), (1, 1, 1, 0.5)]:
        counts = block_prune_counts(rows, cols, bs, s)
        assert sum(counts) == prune_count(s, rows * cols)
        widths = [min(bs, cols - i) for i in range(0, cols, bs)]
        assert all(abs(c - s * w * rows) <= 1 for c, w in zip(counts, widths))


# -- structured magnitude ------------------------------------------------------------------------


def ref_plan(costs, params, budget):
    entries = []
    for g, c in enumerate(costs):
        own = sorted(range(len(c)), key=lambda i: (float(c[i]), i))[:-1]
        entries += [(float(c[i]), g, i) for i in own]
    removed = [[] for _ in costs]
    total = 0
    for _cost, g, i in sorted(entries):
        if total + params[g] > budget:
            break
        total += params[g]
        removed[g].append(i)
    return [sorted(r) for r in removed]


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5)), min_size=1, max_size=5),
       st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_structured_plan_is_the_budget_prefix(groups, seed, frac):
    rng = np.random.default_rng(seed)
    costs = [torch.from_numpy(rng.integers(0, 4, count).astype(np.float32)) for count, _ in groups]
    params = [p for _, p in groups]
    budget = frac * sum(c * p for c, p in groups)
    got = structured_plan(costs, params, budget)
    assert [g.tolist() for g in got] == ref_plan(costs, params, budget)
    assert all(len(g) < c for g, (c, _) in zip(got, groups))


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_structured_magnitude_meets_the_budget(family, sparsity, calib):
    model = make_llama() if family == "llama" else make_opt()
    adapter = adapter_for(model)
    groups = adapter.structure_groups()
    costs = [structure_scores(adapter, g) for g in groups]
    params = [g.params_per_structure for g in groups]
    total = adapter.prunable_params()
    plan = ref_plan(costs, params, sparsity * total)
    removed = sum(len(r) * p for r, p in zip(plan, params))
    report = surgeon.prune(model, MagnitudeConfig(sparsity=sparsity, structure="structured"), calib, device="cpu",
                           progress=False)
    assert report.params_before == total
    assert report.params_after == total - removed == adapter.prunable_params()
    assert removed <= sparsity * total
    assert any(report.extra["structures_removed"].values())
    logits = model(input_ids=calib[:2], use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_kept_structures_name_the_original_rows_and_columns(calib):
    """Magnitude changes no weight, so each kept structure's slices are the original model's, and the
    report's ``kept_structures`` says which they were."""
    model = make_llama()
    original = {n: m.weight.detach().clone() for n, m in adapter_for(model).linears().items()}
    report = surgeon.prune(model, MagnitudeConfig(sparsity=0.4, structure="structured"), calib, device="cpu",
                           progress=False)
    kept = report.extra["kept_structures"]
    adapter = adapter_for(model)
    groups = {g.name: g for g in adapter.structure_groups()}
    assert set(kept) <= set(groups) and any(len(v) < max(v, default=0) + 1 for v in kept.values())
    for name, g in groups.items():
        idx = torch.tensor(kept.get(name, range(g.count)))
        assert idx.numel() == g.count and bool((idx[1:] > idx[:-1]).all())
        for part in g.parts:
            W = adapter.module(part.linear).weight
            want = original[part.linear].index_select(0 if part.axis == "row" else 1, part.indices(idx))
            assert torch.equal(W, want), part.linear


# -- every method end to end ---------------------------------------------------------------------

CONFIGS = {
    "magnitude-matrix": lambda s: MagnitudeConfig(structure=s, sparsity=0.5 if s == "unstructured" else 0.0),
    "magnitude-row": lambda s: MagnitudeConfig(structure=s, scope="row", sparsity=0.5 if s == "unstructured" else 0.0),
    "wanda": lambda s: WandaConfig(structure=s, sparsity=0.5 if s == "unstructured" else 0.0),
    "sparsegpt": lambda s: SparseGPTConfig(structure=s, sparsity=0.5 if s == "unstructured" else 0.0, blocksize=16),
    "admm": lambda s: AdmmConfig(structure=s, sparsity=0.5 if s == "unstructured" else 0.0, gradual=False),
    "admm-gradual": lambda s: AdmmConfig(structure=s, sparsity=0.5 if s == "unstructured" else 0.0),
}


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_end_to_end_exact_sparsity(tiny_model, calib, method, structure):
    cfg = CONFIGS[method](structure)
    report = surgeon.prune(tiny_model, cfg, calib, device="cpu", progress=False)
    assert report.sparsity == cfg.sparsity == 0.5
    lins = adapter_for(tiny_model).linears()
    zeros = sum(int((lin.weight == 0).sum()) for lin in lins.values())
    assert zeros == report.params_before // 2
    if structure != "unstructured":
        n, m = cfg.nm
        for lin in lins.values():
            per_group = (lin.weight == 0).reshape(lin.out_features, -1, m).sum(2)
            assert (per_group == m - n).all()
    logits = tiny_model(input_ids=calib[:2], use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_magnitude_rounding_per_matrix_and_row(tiny_llama, calib):
    ref = {n: lin.weight.detach().clone() for n, lin in adapter_for(tiny_llama).linears().items()}
    model_row = copy.deepcopy(tiny_llama)
    surgeon.prune(tiny_llama, MagnitudeConfig(sparsity=0.3), calib, device="cpu", progress=False)
    surgeon.prune(model_row, MagnitudeConfig(sparsity=0.3, scope="row"), calib, device="cpu", progress=False)
    rows = adapter_for(model_row).linears().values()
    for (name, lin), lin_row in zip(adapter_for(tiny_llama).linears().items(), rows):
        w0 = ref[name]
        np.testing.assert_array_equal((lin.weight != 0).numpy(), ref_matrix_mask(w0.abs().numpy(), 0.3))
        assert int((lin.weight == 0).sum()) == int(round(0.3 * w0.numel()))
        assert ((lin_row.weight == 0).sum(1) == int(round(0.3 * w0.shape[1]))).all()


@torch.no_grad()
def test_wanda_uses_activation_norms_of_the_block_inputs(tiny_llama, calib):
    dense = copy.deepcopy(tiny_llama)
    lins = adapter_for(dense).layer_linears(0)
    acts: dict[str, list] = {n: [] for n in lins}
    hooks = [lin.register_forward_hook(lambda _m, a, _o, n=n: acts[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in lins.items()]
    dense(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    surgeon.prune(tiny_llama, WandaConfig(sparsity=0.5), calib, device="cpu", progress=False, batch_size=3)
    pruned = adapter_for(tiny_llama).layer_linears(0)
    for name, lin in lins.items():
        x = torch.cat(acts[name]).double()
        scores = (lin.weight.double().abs() * x.norm(dim=0)[None, :]).numpy()
        keep = ref_row_mask(scores, 0.5)
        np.testing.assert_array_equal((pruned[name].weight != 0).numpy(), keep)
