"""ADMM: the fixed-mask update reaches the masked least-squares optimum; gradual pruning is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.adapters import adapter_for
from surgeon.masks import nm_mask, row_mask
from surgeon.methods.admm import AdmmConfig, admm_prune, admm_update, cubic_schedule
from surgeon.methods.sparsegpt import sparsegpt_prune
from surgeon.methods.wanda import wanda_mask, wanda_scores


def masked_least_squares(W0, H, keep, damp):
    """Per row: argmin (w − w0)ᵀ H_λ (w − w0) with w = 0 off the mask, H_λ the preconditioned damping of H."""
    W0, H = W0.astype(np.float64), H.astype(np.float64)
    diag = np.diag(H)
    d = np.where(diag > 0, np.sqrt(np.maximum(diag, 0)), 1.0)
    lam = damp * np.mean(diag / d**2)
    Hl = H + lam * np.diag(d**2)  # D(Ĥ + λI)D: the same objective in the original coordinates
    out = np.zeros_like(W0)
    for r in range(W0.shape[0]):
        S, P = keep[r], ~keep[r]
        # δ_S = H_SS⁻¹ H_SP w0_P (the kept weights absorb the removed ones)
        out[r, S] = W0[r, S] + np.linalg.solve(Hl[np.ix_(S, S)], Hl[np.ix_(S, P)] @ W0[r, P])
    return out


def _layer(rng, rows, cols, dead=0):
    X = rng.standard_normal((4 * cols, cols)) * rng.uniform(0.1, 3.0, cols) + rng.standard_normal(cols)
    if dead:
        X[:, rng.choice(cols, dead, replace=False)] = 0.0
    return rng.standard_normal((rows, cols)), X.T @ X


@settings(max_examples=15)
@given(st.integers(1, 5), st.sampled_from([8, 12, 16]), st.floats(0.2, 0.8), st.integers(0, 2**31 - 1),
       st.integers(0, 2))
def test_fixed_mask_converges_to_masked_least_squares(rows, cols, sparsity, seed, dead):
    rng = np.random.default_rng(seed)
    W, H = _layer(rng, rows, cols, dead)
    keep = row_mask(torch.from_numpy(rng.standard_normal((rows, cols))), sparsity)
    got = admm_update(torch.from_numpy(W), torch.from_numpy(H), keep, iterations=400, damp=0.1).numpy()
    ref = masked_least_squares(W, H, keep.numpy(), 0.1)
    assert (got[~keep.numpy()] == 0).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_twenty_iterations_get_most_of_the_way():
    rng = np.random.default_rng(0)
    W, H = _layer(rng, 16, 32)
    keep = row_mask(torch.from_numpy(np.abs(W) * np.sqrt(np.diag(H))), 0.5)
    ref = masked_least_squares(W, H, keep.numpy(), 0.1)

    def err(w):
        d = w - W
        return float(np.einsum("rc,cd,rd->", d, H, d))

    masked = np.where(keep.numpy(), W, 0.0)
    got = admm_update(torch.from_numpy(W).float(), torch.from_numpy(H).float(), keep).double().numpy()
    assert err(ref) <= err(got) < err(ref) + 0.05 * (err(masked) - err(ref))


def test_cubic_schedule():
    vals = [cubic_schedule(0.6, k, 15) for k in range(16)]
    assert vals[0] == 0 and vals[15] == pytest.approx(0.6) and cubic_schedule(0.6, 20, 15) == pytest.approx(0.6)
    assert all(a < b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8", "1:4", "3:8"])
@pytest.mark.parametrize("gradual", [True, False])
def test_admm_prune_exact_patterns(structure, gradual):
    rng = np.random.default_rng(1)
    W, H = _layer(rng, 12, 32, dead=2)
    W, H = torch.from_numpy(W).float(), torch.from_numpy(H).float()
    if structure == "unstructured":
        out = admm_prune(W, H, 0.3, gradual=gradual)
        assert ((out == 0).sum(1) == int(round(0.3 * 32))).all()
    else:
        n, m = map(int, structure.split(":"))
        out = admm_prune(W, H, 1 - n / m, nm=(n, m), gradual=gradual)
        assert ((out == 0).reshape(12, -1, m).sum(2) == m - n).all()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_non_gradual_masks_follow_mask_from():
    rng = np.random.default_rng(2)
    W, H = _layer(rng, 6, 16)
    W, H = torch.from_numpy(W).float(), torch.from_numpy(H).float()
    norms = torch.diagonal(H).sqrt()
    wanda = admm_prune(W, H, 0.5, gradual=False, mask_from="wanda")
    mag = admm_prune(W, H, 0.5, gradual=False, mask_from="magnitude")
    assert torch.equal(wanda != 0, wanda_mask(wanda_scores(W, norms), 0.5))
    assert torch.equal(mag != 0, row_mask(W.abs(), 0.5))
    nm = admm_prune(W, H, 0.5, nm=(2, 4), gradual=False)
    assert torch.equal(nm != 0, nm_mask(W.abs() * norms, 2, 4))


def test_admm_update_improves_other_methods_masks():
    rng = np.random.default_rng(3)
    W, H = _layer(rng, 16, 32)
    Wt, Ht = torch.from_numpy(W).float(), torch.from_numpy(H).float()

    def err(w):
        d = w.double().numpy() - W
        return float(np.einsum("rc,cd,rd->", d, H, d))

    sgpt = sparsegpt_prune(Wt, 2 * Ht / 128, 0.5)
    wanda_keep = wanda_mask(wanda_scores(Wt, torch.diagonal(Ht).sqrt()), 0.5)
    for keep, before in [(sgpt != 0, err(sgpt)), (wanda_keep, err(Wt * wanda_keep))]:
        after = admm_update(Wt, Ht, keep, iterations=100)
        assert torch.equal(after != 0, keep)
        assert err(after) < before


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
def test_gradual_admm_end_to_end(tiny_model, calib, structure):
    cfg = AdmmConfig(structure=structure, sparsity=0.5 if structure == "unstructured" else 0.0)
    report = surgeon.prune(tiny_model, cfg, calib, device="cpu", progress=False)
    assert report.sparsity == 0.5
    for name, lin in adapter_for(tiny_model).linears().items():
        zero = lin.weight == 0
        if structure == "unstructured":
            assert (zero.sum(1) == lin.in_features // 2).all()
        else:
            n, m = cfg.nm
            assert (zero.reshape(lin.out_features, -1, m).sum(2) == m - n).all()
        rec = report.modules[name]
        assert rec["time_s"] >= 0 and 0 <= rec["error"] < 1
    assert torch.isfinite(tiny_model(input_ids=calib[:2], use_cache=False).logits).all()
