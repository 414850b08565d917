"""LLM Surgeon end to end on tiny models, and the two pieces it stands on: slicing and global selection."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_llama, make_opt
from hypothesis import given
from hypothesis import strategies as st

import surgeon
from surgeon.adapters import adapter_for
from surgeon.methods.surgeon import KOBDConfig, LOBDConfig, SurgeonConfig
from surgeon.selection import select_budget

FAMILIES = {"llama": lambda: make_llama(heads=4, kv_heads=2), "opt": make_opt}


def _zero_structures(model, group, removed):
    """Reference for slicing: zero the removed structures' rows/columns in place."""
    ad = adapter_for(model)
    with torch.no_grad():
        for p in group.parts:
            w = ad.module(p.linear).weight
            for s in removed:
                sl = slice(s * p.block, (s + 1) * p.block)
                if p.axis == "row":
                    w[sl] = 0
                    if ad.module(p.linear).bias is not None:
                        ad.module(p.linear).bias[sl] = 0
                else:
                    w[:, sl] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_equals_masking(family):
    """A physically smaller model computes exactly what the zero-masked model computes."""
    model = FAMILIES[family]()
    masked = copy.deepcopy(model)
    ad, ad_m = adapter_for(model), adapter_for(masked)
    g = torch.Generator().manual_seed(0)
    for grp, grp_m in zip(ad.structure_groups(), ad_m.structure_groups()):
        perm = torch.randperm(grp.count, generator=g)
        keep, removed = perm[: max(1, grp.count // 2)], perm[max(1, grp.count // 2):]
        ad.keep_structures(grp, keep)
        _zero_structures(masked, grp_m, removed.tolist())
    x = torch.randint(0, 96, (2, 12), generator=g)
    torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)
    assert ad.prunable_params() < ad_m.prunable_params()


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_reaches_size_within_one_structure(family, calib):
    model = FAMILIES[family]()
    ad = adapter_for(model)
    p0 = ad.prunable_params()
    smallest = min(g.params_per_structure for g in ad.structure_groups())
    report = surgeon.prune(model, SurgeonConfig(sparsity=0.3, structure="structured", shots=3, align=1), calib,
                           device="cpu", progress=False)
    removed = p0 - ad.prunable_params()
    assert 0 <= 0.3 * p0 - removed < smallest  # align=1: exact sizes
    assert [s["shot"] for s in report.shots] == [1, 2, 3]
    assert all(a <= t + 1e-12 for a, t in ((s["achieved_sparsity"], s["target_sparsity"]) for s in report.shots))
    assert torch.isfinite(model(calib[:2]).logits).all()
    assert report.allocation("type")  # per-type allocation is an output of the run


@pytest.mark.parametrize("align", [4, 8])
def test_align_rounds_mlp_widths(align, calib):
    model = make_llama(mlp=64)
    ad = adapter_for(model)
    p0 = ad.prunable_params()
    surgeon.prune(model, SurgeonConfig(sparsity=0.3, structure="structured", shots=2, align=align), calib,
                  device="cpu", progress=False)
    widths = [g.count for g in ad.structure_groups() if g.kind == "mlp"]
    assert all(w % align == 0 for w in widths), widths
    channel = 3 * model.config.hidden_size
    assert abs((p0 - ad.prunable_params()) - 0.3 * p0) <= len(widths) * (align / 2) * channel + channel


def test_update_lowers_the_loss_the_curvature_predicts(calib):
    """With the OBS update the calibration loss is no worse than zeroing alone (same masks, K-OBD)."""
    losses = {}
    for cfg in (SurgeonConfig(sparsity=0.5, shots=2), KOBDConfig(sparsity=0.5, shots=2)):
        m = make_llama(seed=3)
        surgeon.prune(m, cfg, calib, device="cpu", progress=False)
        with torch.no_grad():
            losses[cfg.method] = float(m(calib, labels=calib).loss)
    assert losses["llm-surgeon"] <= losses["k-obd"] + 1e-3


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
def test_exact_sparsity_with_zeros_already_in_the_weights(structure, calib):
    """Dequantised checkpoints hold exact zeros: they are live weights, not earlier removals."""
    model = make_llama(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p[torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) < 0.3] = 0
    surgeon.prune(model, SurgeonConfig(sparsity=0.5 if structure == "unstructured" else 0.0, structure=structure,
                                       shots=3, lowrank_rank=2, lowrank_steps=2), calib, device="cpu", progress=False)
    for name, lin in adapter_for(model).linears().items():
        w = lin.weight
        if structure == "unstructured":
            continue
        n, m = map(int, structure.split(":"))
        assert int((w.view(w.shape[0], -1, m) != 0).sum(-1).max()) <= n, name
    linears = adapter_for(model).linears().values()
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears)
    total = sum(lin.weight.numel() for lin in linears)
    assert zeros >= total // 2


@pytest.mark.parametrize("cfg", [LOBDConfig(sparsity=0.4, shots=2), KOBDConfig(structure="2:4", shots=2),
                                 SurgeonConfig(sparsity=0.4, shots=2, correlation="row", fisher="sampled")])
def test_variants_run_exactly(cfg, calib):
    model = make_opt()
    report = surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    removed = report.params_before - report.params_after
    assert removed == int(cfg.sparsity * report.params_before + 1e-9)  # floor of the target count, exactly


def _reference_budget(costs, weights, budget, keeps, exclude=None):
    """Slow reference: guard each array's most expensive live entries, take the cost-ordered prefix, then fill.

    ``keeps`` is one guard count for all arrays or one per array; ``exclude`` sets of positions never taken."""
    keeps = [keeps] * len(costs) if isinstance(keeps, int) else keeps
    exclude = exclude or [set() for _ in costs]
    items = []
    for i, c in enumerate(costs):
        live = [j for j in np.argsort(c, kind="stable").tolist() if j not in exclude[i]]
        guard = set(live[len(live) - keeps[i]:]) if keeps[i] else set()
        items += [(float(c[j]), i, j) for j in live if j not in guard]
    items.sort()
    taken, spent, prefix = set(), 0, True
    for cost, i, j in items:
        if prefix and spent + weights[i] <= budget:
            taken.add((i, j))
            spent += weights[i]
        else:
            prefix = False
    for cost, i, j in items:
        if (i, j) not in taken and spent + weights[i] <= budget:
            taken.add((i, j))
            spent += weights[i]
    return [sorted(j for (a, j) in taken if a == i) for i in range(len(costs))]


@given(
    st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=7), min_size=1, max_size=4),
    st.lists(st.integers(1, 5), min_size=4, max_size=4),
    st.integers(0, 60),
)
def test_select_budget_matches_reference(raw, weights, budget):
    costs = [np.array(c, dtype=np.float32) for c in raw]
    weights = weights[: len(costs)]
    got = select_budget([torch.from_numpy(c) for c in costs], weights, budget, min_keep=1)
    want = _reference_budget(costs, weights, budget, 1)
    assert [g.tolist() for g in got] == want
    assert sum(len(g) * w for g, w in zip(got, weights)) <= budget


@given(st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=7), min_size=1, max_size=4),
       st.lists(st.integers(1, 5), min_size=4, max_size=4), st.integers(0, 60), st.data())
def test_select_budget_with_exclusions_and_per_array_guards(raw, weights, budget, data):
    """Positions already taken are skipped and the guards count among the live ones (a second call that
    tops up a shot's budget)."""
    costs = [np.array(c, dtype=np.float32) for c in raw]
    weights = weights[: len(costs)]
    keeps = [data.draw(st.integers(0, 2)) for _ in costs]
    exclude = [data.draw(st.sets(st.integers(0, len(c) - 1), max_size=len(c))) if len(c) else set() for c in costs]
    got = select_budget([torch.from_numpy(c) for c in costs], weights, budget, min_keep=keeps,
                        exclude=[torch.tensor(sorted(e), dtype=torch.long) for e in exclude])
    assert [g.tolist() for g in got] == _reference_budget(costs, weights, budget, keeps, exclude)


@pytest.mark.parametrize("allocation", ["layer", "row", "global"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_allocation_paces_shots_and_ends_on_the_exact_pattern(allocation, nm, calib):
    """'layer' removes the same share of every linear's final quota per shot, 'row' of every row's;
    'global' lets one threshold choose; each ends on the exact N:M pattern."""
    n, m = nm
    model = make_llama(seed=2)
    seen, rows = [], []

    def after(rec):
        if rec["shot"] == 1:
            seen.append({k: int((lin.weight == 0).sum()) for k, lin in adapter_for(model).linears().items()})
            rows.append({k: (lin.weight == 0).sum(1) for k, lin in adapter_for(model).linears().items()})

    cfg = SurgeonConfig(structure=f"{n}:{m}", shots=4, nm_allocation=allocation)
    surgeon.prune(model, cfg, calib, device="cpu", progress=False, on_shot=after)
    linears = adapter_for(model).linears()
    for name, lin in linears.items():
        w = lin.weight
        assert int((w.view(w.shape[0], -1, m) == 0).sum(-1).min()) == m - n, name  # exactly M - N per group
    if allocation == "layer":
        for name, lin in linears.items():
            assert seen[0][name] == lin.weight.numel() * (m - n) // m // 4, name
    elif allocation == "row":
        for name, lin in linears.items():
            assert (rows[0][name] == lin.weight.shape[1] * (m - n) // m // 4).all(), name
    else:
        total = sum(lin.weight.numel() for lin in linears.values())
        assert sum(seen[0].values()) == int(total * (m - n) / m / 4)


def test_nm_allocation_is_checked():
    with pytest.raises(ValueError, match="nm_allocation"):
        SurgeonConfig(structure="2:4", nm_allocation="per-row")


def test_row_allocation_removes_each_row_s_cheapest_candidates(calib):
    """One 'row' shot before the last removes, in every row, the k cheapest weights of the costs that keep
    the N:M pattern reachable (an explicit per-row sort of those costs), and no other."""
    from surgeon.curvature import equalize_norms, estimate_kfac
    from surgeon.linalg import damped_inverse
    from surgeon.obs import unstructured as uobs

    cfg = SurgeonConfig(structure="2:4", shots=2, nm_allocation="row", update=False, fisher="empirical")
    ref = make_llama(seed=3)
    linears = adapter_for(ref).linears()
    factors = estimate_kfac(ref, linears, list(calib.split(4)),
                            fisher=cfg.fisher_labels, seed=cfg.seed)
    equalize_norms(factors)
    want = {}
    for name, lin in linears.items():
        W = lin.weight.detach().float()
        c = uobs.weight_costs(W, damped_inverse(factors[name].G, cfg.g_damping).diagonal(),
                              damped_inverse(factors[name].A, cfg.a_damping, mode=cfg.a_damp_mode).diagonal())
        keep = torch.ones_like(W, dtype=torch.bool)
        c = uobs.nm_candidates(uobs.masked_costs(c, keep), keep, 2, 4).numpy()
        k = W.shape[1] // 4
        want[name] = [set(np.argsort(row, kind="stable")[:k].tolist()) for row in c]
    model = make_llama(seed=3)
    got = []
    surgeon.prune(model, cfg, calib, device="cpu", progress=False, batch_size=4,
                  on_shot=lambda rec: got.append({n: (l.weight == 0) for n, l in adapter_for(model).linears().items()})
                  if rec["shot"] == 1 else None)
    for name in linears:
        for r, cols in enumerate(want[name]):
            assert set(got[0][name][r].nonzero().flatten().tolist()) == cols, (name, r)
