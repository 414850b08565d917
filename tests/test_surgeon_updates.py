"""LLM Surgeon's unstructured/N:M update options and low-rank fit options, on fixed curvature and tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_obs_unstructured import spd

import surgeon
from surgeon.adapters import adapter_for
from surgeon.curvature import KFactors
from surgeon.linalg import damped
from surgeon.lowrank import dense_teacher, holdout_count, kl_to, lowrank_update
from surgeon.methods.base import Context
from surgeon.methods.surgeon import SurgeonConfig, _Inverses, _update_weights
from surgeon.obs.masked import masked_optimum, quadratic_loss
from surgeon.report import Report

SETTINGS = settings(max_examples=40, deadline=None)


def _nested_masks(rng, shape, shots):
    """Removal sets of ``shots`` shots that grow toward 60%: shot s removes a fresh share of what is left."""
    order = rng.permutation(shape[0] * shape[1])
    ends = np.linspace(0, 0.6 * order.size, shots + 1).astype(int)
    out = []
    for s in range(shots):
        rm = np.zeros(order.size, dtype=bool)
        rm[order[ends[s]:ends[s + 1]]] = True
        out.append(torch.from_numpy(rm.reshape(shape)))
    return out


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(2, 6), C=st.integers(2, 6), shots=st.integers(2, 4))
def test_every_exact_option_reaches_the_masked_optimum_of_the_dense_weights(seed, R, C, shots):
    """Under a fixed quadratic model, shots that solve with all zeros of the mask (earlier zeros as
    constraints, the dense reference, or CG) end at the one-step masked optimum relative to the dense
    weights; dropping the earlier zeros from the solve never does better."""
    rng = np.random.default_rng(seed)
    W0 = torch.from_numpy(rng.normal(size=(R, C)))
    f = KFactors(A=torch.from_numpy(spd(rng, C)), G=torch.from_numpy(spd(rng, R)), n_tokens=1)
    removals = _nested_masks(rng, (R, C), shots)
    variants = {"unconstrained": {"solver": "obs"}, "constrained": {"solver": "obs", "constrain_removed": True},
                "row constrained": {"constrain_removed": True, "correlation": "row"},
                "dense reference": {"solver": "obs", "reference": "dense"}, "cg": {"solver": "cg", "cg_tol": 1e-13},
                "cg dense": {"solver": "cg", "reference": "dense", "cg_tol": 1e-13}}
    final = {}
    for label, kw in variants.items():
        cfg = SurgeonConfig(max_correlate=R * C, cg_iterations=10 * R * C, **kw)
        inv = _Inverses({"x": f}, cfg)
        W, keep = W0.clone(), torch.ones(R, C, dtype=torch.bool)
        for rm in removals:
            W, _, _ = _update_weights(cfg, "x", W, rm & keep, keep, f, inv, W0 if cfg.reference == "dense" else None)
            keep &= ~rm
            assert (W[~keep] == 0).all()
        final[label] = W
    Gd, Ad = damped(f.G, cfg.g_damping), damped(f.A, cfg.a_damping)
    best = masked_optimum(W0, keep, Gd, Ad, inv.G("x", W0.device), inv.A("x", W0.device), iterations=10 * R * C,
                          tol=1e-13)
    loss = {k: float(quadratic_loss(v - W0, Gd, Ad)) for k, v in final.items()}
    for label in ("constrained", "dense reference", "cg", "cg dense"):
        # the reference is itself iterative (CG to a 1e-13 residual): ill-conditioned draws leave ~1e-8
        np.testing.assert_allclose(final[label].numpy(), best.weight.numpy(), rtol=1e-6, atol=1e-7, err_msg=label)
    assert loss["unconstrained"] >= best.loss * (1 - 1e-9) - 1e-12
    assert loss["row constrained"] >= best.loss * (1 - 1e-9) - 1e-12


def test_options_are_checked():
    with pytest.raises(ValueError, match="solver must be"):
        SurgeonConfig(solver="admm")
    with pytest.raises(ValueError, match="reference"):
        SurgeonConfig(reference="pretrained")
    with pytest.raises(ValueError, match="lowrank_target"):
        SurgeonConfig(lowrank_target="text")
    with pytest.raises(ValueError, match="lowrank_holdout"):
        SurgeonConfig(lowrank_holdout=1.0)
    with pytest.raises(ValueError, match="cg_iterations"):
        SurgeonConfig(cg_iterations=0)
    assert holdout_count(16, 0.125) == 2 and holdout_count(16, 0.0) == 0 and holdout_count(3, 0.9) == 2
    with pytest.raises(ValueError, match="at least 2"):
        holdout_count(1, 0.5)


@pytest.mark.parametrize("cfg", [
    SurgeonConfig(sparsity=0.4, shots=3, solver="cg"),
    SurgeonConfig(structure="2:4", shots=3, solver="cg", reference="dense"),
    SurgeonConfig(sparsity=0.4, shots=2, correlation="row", constrain_removed=True, curvature_fp32=True),
    SurgeonConfig(structure="4:8", shots=2, reference="dense", lowrank_rank=2, lowrank_steps=2, lowrank_final=True,
                  lowrank_masked=True),
])
def test_variants_run_exactly(cfg, calib):
    model = make_llama(seed=2)
    report = surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    removed = report.params_before - report.params_after
    assert removed == int(cfg.sparsity * report.params_before + 1e-9)
    if cfg.solver == "cg" and cfg.correlation == "full":
        assert all(s["cg"]["max_residual"] <= cfg.cg_tol for s in report.shots)
    if cfg.structure != "unstructured":
        n, m = cfg.nm
        for lin in adapter_for(model).linears().values():
            assert int((lin.weight.view(lin.weight.shape[0], -1, m) != 0).sum(-1).max()) <= n


def _context(model, calib, **cfg):
    config = SurgeonConfig(**cfg)
    return Context(model=model, adapter=adapter_for(model), config=config, calibration=calib,
                   device=torch.device("cpu"), report=Report(method="llm-surgeon", config=config.to_dict()),
                   progress=False)


def _held_loss(model, teacher, held):
    """The fit's held-out loss recomputed on the model as it is: KL to the teacher, mean over tokens."""
    with torch.no_grad():
        s = torch.log_softmax(model(held).logits, -1)
        t = torch.log_softmax(teacher(held).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())


def _half_pruned(seed):
    model = make_llama(seed=seed)
    masks = {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, lin in adapter_for(model).linears().items():
            masks[name] = torch.rand(lin.weight.shape, generator=g) < 0.5
            lin.weight.mul_(masks[name])
    return model, masks


@pytest.mark.parametrize("masked", [True, False])
def test_masked_fit_absorbs_exactly_what_it_learnt(masked, calib):
    """Trained through the mask, the absorbed model has exactly the held-out loss the fit measured; trained
    dense, the mask drops part of the update and the absorbed model differs from the one measured."""
    dense = make_llama(seed=4)
    teacher = dense_teacher(dense)
    model, masks = _half_pruned(4)
    ctx = _context(model, calib, lowrank_rank=4)
    info = lowrank_update(ctx, rank=4, steps=6, lr=1e-2, masks=masks, target="dense", teacher=teacher,
                          holdout=0.25, eval_every=1, masked=masked)
    assert info["kept_step"] > 0 and info["holdout_after"] < info["holdout_before"]
    after = _held_loss(model, teacher, calib[-2:])
    if masked:
        assert after == pytest.approx(info["holdout_after"], rel=1e-4)
    else:
        assert abs(after - info["holdout_after"]) > 1e-4 * info["holdout_after"]
    for name, lin in adapter_for(model).linears().items():
        assert (lin.weight[~masks[name]] == 0).all()


def test_holdout_keeps_nothing_when_no_step_helps(calib):
    """Fitting a model to itself: the held-out KL starts at 0, no step can lower it, so nothing is absorbed,
    and the fit stops after two evaluations without improvement."""
    model, masks = _half_pruned(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _context(model, calib)
    info = lowrank_update(ctx, rank=4, steps=8, lr=1e-2, masks=masks, target="dense", teacher=dense_teacher(model),
                          holdout=0.25, eval_every=1)
    assert info["kept_step"] == 0 and info["holdout_after"] == info["holdout_before"] == pytest.approx(0, abs=1e-6)
    assert info["steps"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dense_target_needs_a_teacher(calib):
    model, masks = _half_pruned(1)
    with pytest.raises(ValueError, match="teacher"):
        lowrank_update(_context(model, calib), rank=2, steps=1, lr=1e-3, masks=masks, target="dense")


def test_row_and_none_correlation_use_the_obs_closed_forms_whatever_the_solver():
    """CG solves the full G ⊗ A problem; asking for row or no correlation keeps the OBS closed forms."""
    rng = np.random.default_rng(0)
    W0 = torch.from_numpy(rng.normal(size=(4, 6)))
    f = KFactors(A=torch.from_numpy(spd(rng, 6)), G=torch.from_numpy(spd(rng, 4)), n_tokens=1)
    rm = torch.from_numpy(rng.random((4, 6)) < 0.4)
    keep = torch.ones(4, 6, dtype=torch.bool)
    for corr in ("row", "none"):
        outs = []
        for solver in ("cg", "obs"):
            cfg = SurgeonConfig(solver=solver, correlation=corr)
            W, _, sol = _update_weights(cfg, "x", W0.clone(), rm, keep, f, _Inverses({"x": f}, cfg), None)
            assert sol is None
            outs.append(W)
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), t=st.integers(1, 5), v=st.integers(2, 9))
def test_windowed_kl_equals_the_dense_one(seed, b, t, v):
    """The distillation loss, one window at a time with the softmaxes recomputed in the backward pass, has
    the value and the gradient of KL(p_teacher ‖ p) averaged over every token at once."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    got = kl_to(teacher, logits)
    s = torch.log_softmax(ref_logits, -1).reshape(-1, v)
    p = torch.softmax(teacher, -1).reshape(-1, v)
    want = (p * (p.log() - s)).sum() / (b * t)
    got.backward()
    want.backward()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="differ"):
        kl_to(teacher[..., :-1], logits)
