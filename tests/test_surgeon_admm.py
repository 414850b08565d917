"""ADMM's pieces inside LLM Surgeon: the final refit (``refit='admm'``: the shots' mask refilled by layer-wise
least squares) and the final N:M mask (``nm_final_mask='admm'``: gradual ADMM's selection, filled by the K-FAC
update)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llama, make_opt
from hypothesis import given, settings
from hypothesis import strategies as st
from test_admm import _layer, masked_least_squares
from test_resume import Crash, CrashAfter

import surgeon
from surgeon.adapters import adapter_for
from surgeon.checkpoint import TENSORS_FILE, Checkpointer
from surgeon.curvature import estimate_kfac
from surgeon.masks import prune_count
from surgeon.methods.admm import Preconditioned, admm_nm_mask, admm_prune
from surgeon.methods.surgeon import KOBDConfig, SurgeonConfig

FAST = {"correlation": "row", "shots": 2}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 5), C=st.integers(2, 7))
def test_fixed_mask_admm_reaches_the_damped_masked_least_squares(seed, R, C):
    """The solve the refit uses, against the normal equations of each row on its kept inputs."""
    rng = np.random.default_rng(seed)
    w0, H = _layer(rng, R, C)
    keep = rng.random((R, C)) < 0.6
    pre = Preconditioned.from_gram(torch.from_numpy(H), damp=0.1, rho=1.0)
    got = pre.solve(torch.from_numpy(w0), 3000, mask=torch.from_numpy(keep)).numpy()
    np.testing.assert_allclose(got, masked_least_squares(w0, H, keep, 0.1), atol=1e-6, rtol=1e-5)
    assert (got[~keep] == 0).all()


def _inputs(model, name, calib):
    """XᵀX of ``name``'s inputs over the calibration windows (float64)."""
    lin = adapter_for(model).linears()[name]
    grams = []
    h = lin.register_forward_pre_hook(lambda m, a: grams.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(calib)
    h.remove()
    X = torch.cat(grams)
    return (X.T @ X).numpy()


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_refit_fills_the_shots_mask_with_the_least_squares_weights(calib, structure):
    """Block 0's inputs do not depend on pruning, so there the refitted weights are the damped masked
    least squares toward the dense weights on the calibration inputs, over the mask the shots chose."""
    dense = make_llama()
    name = "model.layers.0.self_attn.q_proj"
    H = _inputs(dense, name, calib)
    w_dense = adapter_for(dense).linears()[name].weight.detach().double().numpy()
    shots_only = make_llama()
    surgeon.prune(shots_only, SurgeonConfig(structure=structure, refit="none", **FAST), calib, device="cpu",
                  progress=False)
    model = make_llama()
    cfg = SurgeonConfig(structure=structure, refit="admm", refit_iterations=3000, **FAST)
    report = surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    for n, lin in adapter_for(model).linears().items():  # the same mask as the shots alone
        ref = adapter_for(shots_only).linears()[n].weight
        assert ((lin.weight != 0) <= (ref != 0)).all(), n
    w = adapter_for(model).linears()[name].weight.detach().double().numpy()
    keep = adapter_for(shots_only).linears()[name].weight.detach().numpy() != 0
    np.testing.assert_allclose(w, masked_least_squares(w_dense, H, keep, 0.1), atol=2e-5, rtol=1e-3)
    rec = report.extra["refit"]
    assert rec["method"] == "admm" and rec["error_after"] < rec["error_before"]


def test_refit_keeps_the_nm_pattern_and_is_off_by_default(calib):
    """N:M refits only when asked (on SmolLM2 the shots' own weights were better on the calibration
    windows); a refit changes the weights and keeps the pattern."""
    assert SurgeonConfig(structure="2:4").refit == "none"
    model = make_opt()
    report = surgeon.prune(model, SurgeonConfig(structure="2:4", refit="admm", **FAST), calib, device="cpu",
                           progress=False)
    assert "refit" in report.extra
    for n, lin in adapter_for(model).linears().items():
        groups = (lin.weight.view(lin.weight.shape[0], -1, 4) != 0).sum(-1)
        assert int(groups.max()) <= 2, n
    plain = make_opt()
    report = surgeon.prune(plain, SurgeonConfig(structure="2:4", **FAST), calib, device="cpu", progress=False)
    assert "refit" not in report.extra
    w = [lin.weight for lin in adapter_for(model).linears().values()]
    v = [lin.weight for lin in adapter_for(plain).linears().values()]
    assert any(not torch.equal(a, b) for a, b in zip(w, v))


def test_bad_refit_options_are_refused():
    with pytest.raises(ValueError, match="refit must be one of"):
        SurgeonConfig(structure="2:4", refit="lstsq")
    with pytest.raises(ValueError, match="refit_iterations"):
        SurgeonConfig(structure="2:4", refit_iterations=0)
    with pytest.raises(ValueError, match="structured pruning removes whole structures"):
        SurgeonConfig(structure="structured", sparsity=0.2, refit="admm")


def test_resumed_refit_run_equals_the_uninterrupted_one(tmp_path, calib):
    """The weights before pruning travel in the checkpoint (tensors.pt), so a resumed run refits to them."""
    cfg = SurgeonConfig(structure="2:4", shots=3, correlation="row", refit="admm")
    ref = make_llama()
    surgeon.prune(ref, cfg, calib, device="cpu", progress=False)
    with pytest.raises(Crash):
        surgeon.prune(make_llama(), cfg, calib, device="cpu", progress=False, checkpoint=CrashAfter(tmp_path / "c", 2))
    ckpt = Checkpointer(tmp_path / "c")
    assert (tmp_path / "c" / TENSORS_FILE).is_file()
    state = ckpt.load_state()
    original = adapter_for(make_llama()).linears()
    assert all(torch.equal(state["_tensors"]["dense"][n], original[n].weight) for n in original)
    model = ckpt.load_model(attn_implementation="eager")
    surgeon.prune(model, cfg, calib, device="cpu", progress=False, checkpoint=ckpt, resume_state=state)
    got, want = adapter_for(model).linears(), adapter_for(ref).linears()
    for n in want:
        torch.testing.assert_close(got[n].weight, want[n].weight, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_the_dense_weights_is_refused(tmp_path, calib):
    cfg = SurgeonConfig(structure="2:4", shots=3, correlation="row", refit="admm")
    with pytest.raises(Crash):
        surgeon.prune(make_llama(), cfg, calib, device="cpu", progress=False, checkpoint=CrashAfter(tmp_path / "c", 1))
    ckpt = Checkpointer(tmp_path / "c")
    state = ckpt.load_state()
    state.pop("_tensors")
    with pytest.raises(ValueError, match="does not hold them"):
        surgeon.prune(ckpt.load_model(attn_implementation="eager"), cfg, calib, device="cpu", progress=False,
                      resume_state=state)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 4), groups=st.integers(1, 4))
def test_admm_nm_mask_is_the_mask_gradual_admm_ends_with(seed, R, groups):
    """Without earlier zeros it is the zero pattern of :func:`admm_prune` (gradual, 2:4): what ADMM keeps
    is inside the mask, and the mask is exactly 2:4."""
    rng = np.random.default_rng(seed)
    C = 4 * groups
    W, H = map(torch.from_numpy, _layer(rng, R, C))
    keep = admm_nm_mask(W, H, 2, 4)
    assert keep.dtype == torch.bool and (keep.view(R, groups, 4).sum(-1) == 2).all()
    pruned = admm_prune(W, H, 0.5, nm=(2, 4))
    assert ((pruned != 0) <= keep).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 4), groups=st.integers(1, 4))
def test_admm_nm_mask_extends_earlier_zeros(seed, R, groups):
    rng = np.random.default_rng(seed)
    C = 4 * groups
    W, H = map(torch.from_numpy, _layer(rng, R, C))
    earlier = torch.ones(R, C, dtype=torch.bool)
    for r in range(R):  # at most one earlier zero per group
        for g in range(groups):
            if rng.random() < 0.7:
                earlier[r, 4 * g + int(rng.integers(4))] = False
    keep = admm_nm_mask(W, H, 2, 4, keep=earlier)
    assert (keep <= earlier).all() and (keep.view(R, groups, 4).sum(-1) == 2).all()
    too_many = earlier.clone()
    too_many[0, :3] = False
    with pytest.raises(ValueError, match="no 2:4 mask extends it"):
        admm_nm_mask(W, H, 2, 4, keep=too_many)


def test_one_shot_with_the_admm_mask_uses_admm_s_mask_on_a(calib):
    """In one shot the mask is gradual ADMM's on each linear's A (the K-FAC input factor of the model), and the
    K-FAC update fills it (the N:M default); the K-FAC costs' mask is another one."""
    cfg = SurgeonConfig(structure="2:4", shots=1, correlation="row")
    assert cfg.nm_final_mask == "admm"
    dense = make_llama()
    linears = adapter_for(dense).linears()
    factors = estimate_kfac(dense, linears, list(calib.split(4)), fisher="empirical", seed=0, gradients=False)
    want = {n: admm_nm_mask(lin.weight.detach().float(), factors[n].A, 2, 4) for n, lin in linears.items()}
    model = make_llama()
    surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    plain = make_llama()
    surgeon.prune(plain, SurgeonConfig(structure="2:4", shots=1, correlation="row", nm_final_mask="kfac"), calib,
                  device="cpu", progress=False)
    differs = False
    for n, lin in adapter_for(model).linears().items():
        assert ((lin.weight != 0) <= want[n]).all(), n
        differs |= not torch.equal(adapter_for(plain).linears()[n].weight != 0, lin.weight != 0)
    assert differs
    with pytest.raises(ValueError, match="nm_final_mask"):
        SurgeonConfig(structure="2:4", nm_final_mask="wanda")


def test_k_obd_completes_groups_by_its_costs(calib):
    """The paper's baselines keep their own mask: K-OBD's last shot completes every group by the K-FAC costs,
    so it equals LLM Surgeon with nm_final_mask='kfac', no update and K-OBD's damping of A (the mean form)."""
    assert KOBDConfig(structure="2:4").nm_final_mask == "kfac"
    a, b = make_llama(), make_llama()
    surgeon.prune(a, KOBDConfig(structure="2:4", shots=1), calib, device="cpu", progress=False)
    surgeon.prune(b, SurgeonConfig(structure="2:4", shots=1, update=False, correlation="none", solver="obs",
                                   nm_final_mask="kfac", damp_a=0.01, damp_mode_a="mean"), calib, device="cpu",
                  progress=False)
    for (n, la), lb in zip(adapter_for(a).linears().items(), adapter_for(b).linears().values()):
        assert torch.equal(la.weight, lb.weight), n


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), R=st.integers(1, 5), groups=st.integers(1, 4), frac=st.floats(0.0, 1.0))
def test_admm_nm_mask_steps_toward_the_pattern(seed, R, groups, frac):
    """A share below 1 - N/M removes that share of every row, never more than M - N of a group, and it
    extends earlier zeros that fit under it; the full share is the N:M mask itself."""
    rng = np.random.default_rng(seed)
    C = 4 * groups
    W, H = map(torch.from_numpy, _layer(rng, R, C))
    share = 0.5 * frac
    keep = admm_nm_mask(W, H, 2, 4, sparsity=share)
    removed = ~keep
    assert (removed.sum(1) == prune_count(share, C)).all()
    assert (removed.view(R, groups, 4).sum(-1) <= 2).all()
    assert torch.equal(admm_nm_mask(W, H, 2, 4, sparsity=0.5), admm_nm_mask(W, H, 2, 4))
    later = admm_nm_mask(W, H, 2, 4, keep=keep, sparsity=max(share, 0.25))
    assert (later <= keep).all() and (~later).sum(1).eq(max(prune_count(share, C), prune_count(0.25, C))).all()
    with pytest.raises(ValueError, match="at most 0.5"):
        admm_nm_mask(W, H, 2, 4, sparsity=0.6)


def test_every_shot_chooses_by_admm(calib):
    """nm_admm_shots=shots: every shot removes its share of every row by ADMM's selection, the earlier zeros
    stay, the last shot ends exactly 2:4; a mask unlike the one where only the last shot uses ADMM."""
    seen = []
    model = make_llama()
    surgeon.prune(model, SurgeonConfig(structure="2:4", shots=2, nm_admm_shots=2, correlation="row"), calib,
                  device="cpu", progress=False,
                  on_shot=lambda rec: seen.append({n: (lin.weight != 0).clone()
                                                   for n, lin in adapter_for(model).linears().items()}))
    first, last = seen
    for n, keep in first.items():
        rows = keep.shape[1]
        assert ((~keep).sum(1) >= prune_count(0.25, rows)).all(), n  # dequantised zeros may add to it
        assert (last[n] <= keep).all(), n
        assert (last[n].view(keep.shape[0], -1, 4).sum(-1) == 2).all(), n
    one = make_llama()
    surgeon.prune(one, SurgeonConfig(structure="2:4", shots=2, correlation="row"), calib, device="cpu", progress=False)
    assert any(not torch.equal(lin.weight != 0, last[n]) for n, lin in adapter_for(one).linears().items())
    with pytest.raises(ValueError, match="nm_admm_shots"):
        SurgeonConfig(structure="2:4", nm_admm_shots=0)
