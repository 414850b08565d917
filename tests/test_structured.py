"""Structured pruning options: query-slot attention structures, output-side updates and costs, per-parameter
ranking, aligned MLP widths in every shot or at the end, uniform shapes; the allocation and slicing below them."""

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
from surgeon.adapters.base import Part, StructureGroup
from surgeon.allocation import effective_multiple, plan
from surgeon.io import load_pruned, read_shapes, save_pruned
from surgeon.methods.surgeon import SurgeonConfig


def gqa(**kw):
    """Tiny GQA Llama with room for aligned widths: 4 queries per KV group, MLP 64 wide."""
    args = dict(layers=3, hidden=32, mlp=64, heads=8, kv_heads=2)
    args.update(kw)
    return make_llama(**args)


def _mask_output_columns(model, removals):
    """Reference: silence structures by zeroing their output-side columns (o_proj / down_proj) in place."""
    ad = adapter_for(model)
    with torch.no_grad():
        for g, rm in removals:
            for p in g.output_parts:
                ad.module(p.linear).weight[:, p.indices(torch.as_tensor(rm))] = 0


def test_part_indices_with_stride():
    p = Part("x", "row", block=2, stride=6, repeats=3)  # slot k of 3 groups of 3 heads of 2 rows
    assert p.indices(torch.tensor([1])).tolist() == [2, 3, 8, 9, 14, 15]
    assert p.sets(3).shape == (3, 6)
    assert sorted(p.sets(3).flatten().tolist()) == list(range(18))  # the slots partition the rows
    assert Part("y", "col", block=4).indices(torch.tensor([0, 2])).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_removing_query_slots_and_kv_groups_equals_masking(attn_impl):
    """Query slots and KV groups removed from one layer together: the smaller model computes what the
    masked one does, and the attention module's head bookkeeping follows."""
    model = gqa()
    model.config._attn_implementation = attn_impl
    masked = copy.deepcopy(model)
    ad, ad_m = adapter_for(model), adapter_for(masked)
    groups = ad.structure_groups(attention="both")
    kinds = {(g.layer, g.kind): g for g in groups}
    removals = [(kinds[0, "query"], torch.tensor([1, 3])), (kinds[0, "attn"], torch.tensor([0])),
                (kinds[1, "query"], torch.tensor([2])), (kinds[2, "attn"], torch.tensor([1])),
                (kinds[1, "mlp"], torch.tensor([0, 5, 63]))]
    p0 = ad.prunable_params()
    freed = ad.freed_params(removals)
    _mask_output_columns(masked, removals)
    ad.remove_structures(removals)
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)
    assert p0 - ad.prunable_params() == freed
    attn = [layer.self_attn for layer in ad.layers]
    assert [a.num_key_value_groups for a in attn] == [2, 3, 4]
    assert [a.k_proj.out_features // a.head_dim for a in attn] == [1, 2, 1]
    assert ad.layer_shapes() == [{"attn": 1, "query": 2, "mlp": 64}, {"attn": 2, "query": 3, "mlp": 61},
                                 {"attn": 1, "mlp": 64}]
    assert ad.kept["model.layers.0.self_attn.query"].tolist() == [0, 2]


@given(st.data())
def test_freed_params_counts_shared_weights_once(data):
    model = gqa(layers=1)
    ad = adapter_for(model)
    groups = ad.structure_groups(attention="both")
    removals = [(g, torch.tensor(sorted(data.draw(st.sets(st.integers(0, g.count - 1), max_size=g.count - 1))),
                                 dtype=torch.long)) for g in groups]
    p0 = ad.prunable_params()
    freed = ad.freed_params(removals)
    assert freed <= sum(len(rm) * g.params_per_structure for g, rm in removals)
    ad.remove_structures(removals)
    assert p0 - ad.prunable_params() == freed


def test_removing_every_structure_is_refused():
    ad = adapter_for(gqa())
    g = ad.structure_groups(attention="query")[0]
    with pytest.raises(ValueError, match="at least one structure must remain"):
        ad.remove_structures([(g, torch.arange(g.count))])
    with pytest.raises(ValueError, match="attention must be one of"):
        ad.structure_groups(attention="heads")


def test_query_slots_save_and_reload(tmp_path):
    model = gqa()
    ad = adapter_for(model)
    q = [g for g in ad.structure_groups(attention="both") if g.kind == "query"]
    ad.remove_structures([(q[0], torch.tensor([0])), (q[2], torch.tensor([1, 2, 3]))])
    save_pruned(model, tmp_path)
    assert read_shapes(tmp_path) == [{"attn": 2, "query": 3, "mlp": 64}, {"attn": 2, "mlp": 64},
                                     {"attn": 2, "query": 1, "mlp": 64}]
    back = load_pruned(tmp_path)
    x = torch.randint(0, 96, (2, 10))
    torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


# -- selection and allocation ------------------------------------------------------------------------


def _mlp_groups(n_layers, width, pps=3, full=None):
    return [StructureGroup(name=f"l{i}.mlp", kind="mlp", layer=i, parts=(Part(f"l{i}.down", "col", 1),),
                           count=width, params_per_structure=pps, full_count=full) for i in range(n_layers)]


def test_effective_multiple_shrinks_for_small_layers():
    g = _mlp_groups(1, 1536)[0]
    assert effective_multiple(g, 64) == 64 and effective_multiple(g, 512) == 256  # 1536 holds 3 multiples of 512
    assert effective_multiple(_mlp_groups(1, 48)[0], 64) == 8
    assert effective_multiple(_mlp_groups(1, 20, full=1536)[0], 64) == 64  # the unpruned width decides
    attn = StructureGroup("a", "attn", 0, (), 4, 10)
    assert effective_multiple(attn, 64) == 1


@given(st.integers(1, 4), st.sampled_from([40, 64, 100]), st.sampled_from([4, 8]), st.integers(0, 10_000), st.data())
def test_chunked_selection_keeps_widths_aligned(n_layers, width, align, seed, data):
    """In every shot, each layer loses whole chunks (its cheapest channels first): widths stay multiples,
    an unaligned width first loses its remainder, and one multiple always stays."""
    groups = _mlp_groups(n_layers, width)
    gen = torch.Generator().manual_seed(seed)
    costs = [torch.rand(width, generator=gen) for _ in groups]
    budget = data.draw(st.integers(0, n_layers * width * 3))
    picks = plan(groups, costs, budget, lambda p: sum(len(x) * 3 for x in p), align=align, align_every=True)
    a = effective_multiple(groups[0], align)
    for g, c, rm in zip(groups, costs, picks):
        left = width - len(rm)
        assert left % a == 0 or len(rm) == 0, (width, left, a)
        assert left >= a
        if len(rm):  # whatever a layer loses is its cheapest channels
            assert float(c[rm].max()) <= float(np.delete(c.numpy(), rm.numpy()).min())
    assert sum(len(rm) * 3 for rm in picks) <= budget


def _attn_mlp_groups(n_layers, n_attn=3, attn_pps=40, width=16, pps=3):
    out = []
    for i in range(n_layers):
        out.append(StructureGroup(f"l{i}.attn", "attn", i, (Part(f"l{i}.o", "col", 4),), n_attn, attn_pps))
        out.append(StructureGroup(f"l{i}.mlp", "mlp", i, (Part(f"l{i}.down", "col", 1),), width, pps))
    return out


def _simple_freed(groups):
    return lambda picks: sum(len(p) * g.params_per_structure for g, p in zip(groups, picks))


def _reference_uniform(costs_a, costs_m, n_layers, budget, attn_pps, pps, align):
    """Slow reference: every (attention, MLP) count pair, its cost interpolated to the budget between the MLP
    counts just below and above it; the cheapest pair wins and takes the nearer MLP count."""
    width = len(costs_m[0])
    steps = [0] + list(range(align, width - align + 1, align))
    cum_a = sum(np.concatenate([[0.0], np.cumsum(np.sort(c))]) for c in costs_a)
    cum_m = sum(np.concatenate([[0.0], np.cumsum(np.sort(c))]) for c in costs_m)
    best = None
    for a in range(len(costs_a[0])):
        left = budget / n_layers - a * attn_pps
        if left < 0:
            continue
        lo = max(i for i, m in enumerate(steps) if m * pps <= left)
        m_lo = steps[lo]
        spent_lo = n_layers * (a * attn_pps + m_lo * pps)
        if lo + 1 == len(steps):
            if spent_lo != budget:
                continue
            best = min(best or (np.inf,), (cum_a[a] + cum_m[m_lo], a, m_lo))
            continue
        m_hi = steps[lo + 1]
        spent_hi = n_layers * (a * attn_pps + m_hi * pps)
        rate = (cum_m[m_hi] - cum_m[m_lo]) / (spent_hi - spent_lo)
        score = cum_a[a] + cum_m[m_lo] + (budget - spent_lo) * rate
        m = m_lo if budget - spent_lo <= spent_hi - budget else m_hi
        best = min(best or (np.inf,), (score, a, m))
    return best[1:] if best and np.isfinite(best[0]) else None


@given(st.integers(1, 4), st.integers(0, 10_000), st.sampled_from([1, 4]), st.data())
def test_uniform_allocation_matches_the_reference(n_layers, seed, align, data):
    """Every layer loses the same numbers of each kind, each its own cheapest, in the mix the reference picks;
    the size lands within half an MLP step per layer of the budget."""
    groups = _attn_mlp_groups(n_layers)
    gen = torch.Generator().manual_seed(seed)
    costs = [torch.rand(g.count, generator=gen) * (10 if g.kind == "attn" else 1) for g in groups]
    budget = data.draw(st.integers(0, n_layers * 60))
    picks = plan(groups, costs, budget, _simple_freed(groups), allocation="uniform", align=align, final=True)
    k_attn = {len(p) for g, p in zip(groups, picks) if g.kind == "attn"}
    k_mlp = {len(p) for g, p in zip(groups, picks) if g.kind == "mlp"}
    assert len(k_attn) == 1 and len(k_mlp) == 1
    ka, km = k_attn.pop(), k_mlp.pop()
    assert (16 - km) % align == 0 and 16 - km >= align
    for g, c, p in zip(groups, costs, picks):
        if len(p):
            assert float(c[p].max()) <= float(np.delete(c.numpy(), p.numpy()).min())
    ref = _reference_uniform([c.numpy() for g, c in zip(groups, costs) if g.kind == "attn"],
                             [c.numpy() for g, c in zip(groups, costs) if g.kind == "mlp"],
                             n_layers, budget, 40, 3, align)
    if ref is not None:
        assert (ka, km) == ref
        assert abs(n_layers * (ka * 40 + km * 3) - budget) <= n_layers * 3 * align / 2


def test_uniform_needs_equal_layers():
    groups = _attn_mlp_groups(2)
    groups[3] = StructureGroup("l1.mlp", "mlp", 1, (Part("l1.down", "col", 1),), 12, 3)
    with pytest.raises(ValueError, match="same shape"):
        plan(groups, [torch.rand(g.count) for g in groups], 20, _simple_freed(groups), allocation="uniform")


def test_per_parameter_ranking_weighs_big_structures_by_what_they_free():
    """An attention group 10x the size of a channel but 5x its cost goes first per parameter, last by cost."""
    groups = _attn_mlp_groups(1, n_attn=2, attn_pps=30, width=20, pps=3)
    costs = [torch.tensor([5.0, 50.0]), torch.ones(20)]
    by_cost = plan(groups, costs, 30, _simple_freed(groups), rank="cost")
    per_param = plan(groups, costs, 30, _simple_freed(groups), rank="per_param")
    assert len(by_cost[0]) == 0 and len(by_cost[1]) == 10
    assert per_param[0].tolist() == [0] and len(per_param[1]) == 0


# -- end to end --------------------------------------------------------------------------------------

OPTIONS = {
    "output update": dict(structured_update="output"),
    "output update and cost": dict(structured_update="output", structured_cost="output"),
    "per-parameter": dict(structured_rank="per_param", structured_update="output", structured_cost="output"),
    "query slots": dict(attention="query", structured_rank="per_param"),
    "both attention kinds": dict(attention="both", structured_rank="per_param", structured_update="output"),
    "aligned every shot": dict(align=8, align_when="shot", attention="both"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_structured_options_reach_the_size_and_reload(option, calib, tmp_path):
    model = gqa()
    ad = adapter_for(model)
    p0 = ad.prunable_params()
    kw = {"sparsity": 0.4, "structure": "structured", "shots": 3, "align": 1, **OPTIONS[option]}
    widths = []

    def after(rec):
        widths.append([g.count for g in ad.structure_groups() if g.kind == "mlp"])

    report = surgeon.prune(model, SurgeonConfig(**kw), calib, device="cpu", progress=False, on_shot=after)
    removed = p0 - ad.prunable_params()
    smallest = kw["align"] * 3 * model.config.hidden_size  # one MLP step
    assert 0 <= 0.4 * p0 - removed < smallest
    if kw["align"] > 1:
        assert all(w % kw["align"] == 0 for ws in widths for w in ws), widths
    x = calib[:2]
    out = model(x).logits
    assert torch.isfinite(out).all()
    save_pruned(model, tmp_path, report=report)
    torch.testing.assert_close(load_pruned(tmp_path)(x).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["kv_group", "both"])
@pytest.mark.parametrize("align_when", ["end", "shot"])
def test_uniform_allocation_gives_one_shape(attention, align_when, calib, tmp_path):
    model = gqa()
    ad = adapter_for(model)
    p0 = ad.prunable_params()
    shapes = []
    cfg = SurgeonConfig(sparsity=0.4, structure="structured", shots=3, allocation="uniform", attention=attention,
                        align=8, align_when=align_when)
    surgeon.prune(model, cfg, calib, device="cpu", progress=False,
                  on_shot=lambda rec: shapes.append(ad.layer_shapes()))
    for s in shapes:  # every shot leaves one shape in every layer
        assert all(layer == s[0] for layer in s), s
    assert shapes[-1][0]["mlp"] % 8 == 0
    if align_when == "shot":
        assert all(s[0]["mlp"] % 8 == 0 for s in shapes)
    step = 8 * 3 * model.config.hidden_size * len(ad.layers)  # one aligned MLP step in every layer
    assert abs((p0 - ad.prunable_params()) - 0.4 * p0) <= step / 2
    out = model(calib[:2]).logits
    save_pruned(model, tmp_path)
    torch.testing.assert_close(load_pruned(tmp_path)(calib[:2]).logits, out, rtol=1e-5, atol=1e-5)


def test_output_side_update_touches_only_output_linears(calib):
    """With 'output' updates the kept rows of gate/up/q/k/v are the original weights, sliced."""
    model = gqa(layers=2)
    dense = copy.deepcopy(model)
    ad = adapter_for(model)
    report = surgeon.prune(model, SurgeonConfig(sparsity=0.3, structure="structured", shots=1, align=1,
                                                structured_update="output", structured_cost="output"),
                           calib, device="cpu", progress=False)
    kept = report.extra["kept_structures"]
    for i in range(2):
        p = f"model.layers.{i}"
        rows = torch.tensor(kept.get(f"{p}.mlp", list(range(64))))
        for lin in ("gate_proj", "up_proj"):
            w0 = dense.get_submodule(f"{p}.mlp.{lin}").weight[rows]
            assert torch.equal(ad.module(f"{p}.mlp.{lin}").weight, w0)
        down0 = dense.get_submodule(f"{p}.mlp.down_proj").weight[:, rows]
        assert not torch.equal(ad.module(f"{p}.mlp.down_proj").weight, down0) or len(rows) == 64


def test_default_align_is_64_and_small_layers_stay_prunable(calib):
    """The default keeps MLP widths at multiples of 64; a 64-wide tiny layer uses 16 instead of freezing."""
    assert SurgeonConfig().align == 64
    model = gqa()
    ad = adapter_for(model)
    surgeon.prune(model, SurgeonConfig(sparsity=0.3, structure="structured", shots=2), calib, device="cpu",
                  progress=False)
    widths = [g.count for g in ad.structure_groups() if g.kind == "mlp"]
    assert all(w % 16 == 0 for w in widths) and min(widths) < 64, widths


@pytest.mark.parametrize("field,value", [("align_when", "always"), ("structured_update", "rows"),
                                         ("structured_cost", "max"), ("structured_rank", "size"),
                                         ("attention", "heads"), ("allocation", "layer")])
def test_structured_options_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        SurgeonConfig(structure="structured", **{field: value})


def test_opt_accepts_every_attention_kind(calib):
    """Multi-head attention: a head is its own KV group and query slot."""
    model = make_opt()
    surgeon.prune(model, SurgeonConfig(sparsity=0.3, structure="structured", shots=2, attention="both", align=1,
                                       structured_rank="per_param"), calib, device="cpu", progress=False)
    assert torch.isfinite(model(calib[:2]).logits).all()


def test_default_fisher_draws_labels_from_the_model_but_unstructured(calib, monkeypatch):
    """Structured and N:M runs estimate the Fisher with sampled labels unless told otherwise; unstructured
    runs keep the text's labels. Checked where the curvature is estimated, not on the config alone."""
    from surgeon.methods import surgeon as surgeon_method

    assert SurgeonConfig(structure="unstructured").fisher_labels == "empirical"
    assert SurgeonConfig(structure="2:4").fisher_labels == "sampled"
    assert SurgeonConfig(structure="2:4", fisher="empirical").fisher_labels == "empirical"
    assert SurgeonConfig(structure="structured", sparsity=0.2, fisher="empirical").fisher_labels == "empirical"
    with pytest.raises(ValueError, match="fisher"):
        SurgeonConfig(fisher="true")
    seen = []
    real = surgeon_method.estimate_kfac

    def spy(*args, **kwargs):
        seen.append(kwargs["fisher"])
        return real(*args, **kwargs)

    monkeypatch.setattr(surgeon_method, "estimate_kfac", spy)
    surgeon.prune(gqa(), SurgeonConfig(sparsity=0.2, structure="structured", shots=2, align=1), calib,
                  device="cpu", progress=False)
    surgeon.prune(gqa(), SurgeonConfig(sparsity=0.2, structure="unstructured", shots=1), calib, device="cpu",
                  progress=False)
    surgeon.prune(gqa(), SurgeonConfig(structure="2:4", shots=1), calib, device="cpu", progress=False)
    assert seen == ["sampled", "sampled", "empirical", "sampled"]


def test_structured_default_damping_of_a_is_the_measured_one(calib):
    """Structured runs damp A by 0.1 unless told otherwise (unstructured 0.01, N:M 0.03 of each input's own
    variance); the default is that value, not another path: the same run with damp_a=0.1 gives the same
    model, with 0.01 another one."""
    assert SurgeonConfig(structure="structured", sparsity=0.2).a_damping == 0.1
    assert SurgeonConfig(structure="unstructured").a_damping == 0.01
    assert (SurgeonConfig(structure="2:4").a_damping, SurgeonConfig(structure="2:4").a_damp_mode) == (0.03, "diagonal")
    assert SurgeonConfig(structure="unstructured").a_damp_mode == "mean"
    from surgeon.methods.surgeon import KOBDConfig, LOBDConfig

    for baseline in (KOBDConfig, LOBDConfig):  # the papers' baselines keep the form they were measured with
        assert (baseline(structure="2:4").a_damping, baseline(structure="2:4").a_damp_mode) == (0.01, "mean")
    assert SurgeonConfig(structure="structured", sparsity=0.2, damp_a=0.3).a_damping == 0.3
    with pytest.raises(ValueError, match="damping"):
        SurgeonConfig(damp_a=-1.0)
    weights = {}
    for label, damp in (("default", None), ("0.1", 0.1), ("0.01", 0.01)):
        model = gqa()
        cfg = SurgeonConfig(sparsity=0.3, structure="structured", shots=2, align=1, damp_a=damp)
        surgeon.prune(model, cfg, calib, device="cpu", progress=False)
        weights[label] = [p.detach().clone() for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(weights["default"], weights["0.1"]))
    assert same and len(weights["default"]) == len(weights["0.1"])
    differ = [a.shape != b.shape or not torch.equal(a, b) for a, b in zip(weights["default"], weights["0.01"])]
    assert any(differ)
