"""FLAP: channel scores, standardisation, the three structure searches, bias compensation, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llama, make_opt
from hypothesis import given
from hypothesis import strategies as st

import surgeon
from surgeon.adapters import adapter_for, slice_linear
from surgeon.methods import flap as F
from surgeon.methods.flap import FlapConfig
from surgeon.sequential import Moments

# -- scores ------------------------------------------------------------------------------------------


def _moments(x: torch.Tensor, batches: int = 3) -> Moments:
    m = Moments(x.shape[1])
    for chunk in x.chunk(batches):
        m.update(chunk)
    return m


def test_channel_scores_match_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * torch.arange(1, 7) + 3.0
    w = torch.randn(5, 6)
    m = _moments(x)
    var, ms = m.variance(), m.sq / m.n
    ref_var = x.double().var(0, unbiased=False)
    torch.testing.assert_close(F.channel_scores("ifv", w, var, ms), ref_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.channel_scores("wifv", w, var, ms), ref_var * w.double().square().sum(0),
                               rtol=1e-5, atol=1e-6)
    wifn = w.double().abs().mean(0) * x.double().norm(dim=0) / math.sqrt(x.shape[0])
    torch.testing.assert_close(F.channel_scores("wifn", w, var, ms), wifn, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        F.channel_scores("nope", w, var, ms)


def test_structure_scores_sum_blocks():
    s = torch.arange(12, dtype=torch.float64)
    torch.testing.assert_close(F.structure_scores(s, 4), torch.tensor([6.0, 22.0, 38.0], dtype=torch.float64))


def test_structure_z_both_ways_keep_the_order_within_a_layer():
    torch.manual_seed(0)
    s = torch.rand(24, dtype=torch.float64) * torch.rand(24, dtype=torch.float64)
    ch = F.structure_z(s, 6, "channels")
    torch.testing.assert_close(ch, F.standardize(s).reshape(4, 6).mean(1))
    st_ = F.structure_z(s, 6, "structures")
    torch.testing.assert_close(st_, F.standardize(F.structure_scores(s, 6)))
    assert torch.equal(ch.argsort(), st_.argsort())
    torch.testing.assert_close(F.structure_z(s, 1, "channels"), F.structure_z(s, 1, "structures"))
    with pytest.raises(ValueError):
        F.structure_z(s, 6, "nope")


def test_standardize():
    z = F.standardize(torch.tensor([1.0, 2.0, 4.0, 9.0]))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std()) - 1.0) < 1e-12
    assert torch.equal(F.standardize(torch.full((5,), 3.0)), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(F.standardize(torch.tensor([7.0])), torch.zeros(1, dtype=torch.float64))


# -- bias compensation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_bias_compensation_is_exact_for_constant_inputs(bias):
    """Removed inputs that never fluctuate are replaced exactly by their mean through the bias."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=bias).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    removed = torch.tensor([1, 4, 6])
    x[:, removed] = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5, 7])
    shift = F.bias_shift(lin.weight, _moments(x).mean, removed)
    small = slice_linear(lin, cols=kept)
    if not bias:
        small.bias = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    with torch.no_grad():
        small.bias += shift
    torch.testing.assert_close(small(x[:, kept]), lin(x), rtol=1e-6, atol=1e-6)


# -- search ----------------------------------------------------------------------------------------


@st.composite
def _problems(draw):
    n = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, 7), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(["attn", "mlp"]), min_size=n, max_size=n))
    size = {"attn": draw(st.integers(2, 9)), "mlp": draw(st.integers(1, 3))}
    weights = [size[k] for k in kinds]
    # few distinct values, so that ties are common
    zs = [torch.tensor(draw(st.lists(st.integers(-3, 3), min_size=c, max_size=c)), dtype=torch.float32) / 2
          for c in counts]
    sparsity = draw(st.floats(0.01, 0.95))
    budget = math.floor(sparsity * sum(c * w for c, w in zip(counts, weights)))
    return zs, weights, kinds, budget, sparsity


def _order(zs, groups):
    """Reference global order: (score, group order, index), each group's last structure excluded."""
    out = []
    for g in groups:
        ranked = sorted(range(zs[g].numel()), key=lambda j: (float(zs[g][j]), j))
        out += [(float(zs[g][j]), g, j) for j in ranked[:-1]]
    return sorted(out)


def _ref_prefix(zs, weights, groups, budget):
    taken, spent = set(), 0
    for _, g, j in _order(zs, groups):
        if spent + weights[g] > budget:
            break
        taken.add((g, j))
        spent += weights[g]
    return taken


def _common_checks(zs, weights, budget, removed):
    spent = sum(int(r.numel()) * w for r, w in zip(removed, weights))
    assert spent <= budget
    for z, r in zip(zs, removed):
        assert r.numel() <= z.numel() - 1 or z.numel() == 0  # >= 1 structure kept per group
        assert torch.equal(r, r.sort().values) and r.unique().numel() == r.numel()
        ranked = sorted(range(z.numel()), key=lambda j: (float(z[j]), j))
        assert set(r.tolist()) == set(ranked[: r.numel()])  # cheapest first within a group
    return spent


@given(_problems())
def test_al_am_is_the_longest_affordable_prefix(p):
    zs, weights, kinds, budget, sparsity = p
    removed = F.search_structures(zs, weights, kinds, budget, "al-am", sparsity)
    spent = _common_checks(zs, weights, budget, removed)
    got = {(g, j) for g, r in enumerate(removed) for j in r.tolist()}
    assert got == _ref_prefix(zs, weights, range(len(zs)), budget)
    rest = [weights[g] for _, g, j in _order(zs, range(len(zs))) if (g, j) not in got]
    assert not rest or budget - spent < max(weights)  # within one structure of the budget


@given(_problems())
def test_al_mm_cuts_each_kind_at_its_parameter_share(p):
    zs, weights, kinds, budget, sparsity = p
    removed = F.search_structures(zs, weights, kinds, budget, "al-mm", sparsity)
    spent = _common_checks(zs, weights, budget, removed)
    total = sum(z.numel() * w for z, w in zip(zs, weights))
    largest = {k: max(w for w, kk in zip(weights, kinds) if kk == k) for k in set(kinds)}
    order = sorted(largest, key=lambda k: (-largest[k], k))
    used = 0
    for pos, k in enumerate(order):
        groups = [g for g in range(len(zs)) if kinds[g] == k]
        share = sum(zs[g].numel() * weights[g] for g in groups)
        b = budget - used if pos == len(order) - 1 else min(budget * share // total, budget - used)
        got = {(g, j) for g in groups for j in removed[g].tolist()}
        assert got == _ref_prefix(zs, weights, groups, b)
        used += sum(weights[g] for g, _ in got)
    assert used == spent


@given(_problems())
def test_ul_um_is_uniform_within_one_structure(p):
    zs, weights, kinds, budget, sparsity = p
    removed = F.search_structures(zs, weights, kinds, budget, "ul-um", sparsity)
    spent = _common_checks(zs, weights, budget, removed)
    for z, r, w in zip(zs, removed, weights):
        base = min(math.floor(round(sparsity * z.numel(), 9)), z.numel() - 1)
        assert r.numel() in (base, base + 1)
        if r.numel() == base and base < z.numel() - 1:
            assert w > budget - spent  # an extra structure would not have fitted


def test_ul_um_is_exactly_uniform_when_fractions_divide():
    zs = [torch.randn(10, dtype=torch.float64) for _ in range(4)]
    removed = F.search_structures(zs, [3] * 4, ["mlp"] * 4, 3 * 12, "ul-um", 0.3)
    assert [r.numel() for r in removed] == [3, 3, 3, 3]


def test_search_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        F.search_structures([torch.tensor([0.0, math.nan])], [1], ["mlp"], 1, "al-am", 0.5)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_prefix_counts_matches_the_reference_rule(backend):
    """Whichever backend computes it, the rule is the sorted-prefix one."""
    from surgeon import _backend

    if backend not in _backend.available_backends():
        pytest.skip(f"backend {backend} not available")
    previous = _backend.backend_name()
    _backend.set_backend(backend)
    try:
        _check_prefix_counts()
    finally:
        _backend.set_backend(previous)


def _check_prefix_counts():
    g = torch.Generator().manual_seed(0)
    arrays = [torch.randint(-3, 4, (n,), generator=g).float() for n in (5, 9, 1, 0, 7)]
    arrays[0][1] = -0.0
    arrays[2][0] = 0.0
    weights = [4, 1, 3, 2, 2]
    for budget in range(0, 60, 3):
        assert F.prefix_counts(arrays, weights, budget) == F._prefix_counts_torch(arrays, weights, budget)
    with pytest.raises(ValueError):
        F.prefix_counts(arrays, weights, -1)


# -- config ----------------------------------------------------------------------------------------


def test_config_validates_and_round_trips():
    cfg = FlapConfig(sparsity=0.2, metric="wifn", search="ul-um", bias_compensation=False)
    assert FlapConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"metric": "x"}, {"search": "x"}, {"standardize": "x"}, {"structure": "unstructured"},
                {"structure": "2:4"}):
        with pytest.raises(ValueError):
            FlapConfig(**bad)


# -- end to end ------------------------------------------------------------------------------------

_MODELS = {"llama": lambda: make_llama(heads=4, kv_heads=2), "opt": make_opt}


@pytest.mark.parametrize("search", F.SEARCHES)
@pytest.mark.parametrize("metric", F.METRICS)
@pytest.mark.parametrize("family", sorted(_MODELS))
def test_prune_end_to_end(family, metric, search, calib):
    model = _MODELS[family]()
    adapter = adapter_for(model)
    groups = adapter.structure_groups()
    before = adapter.prunable_params()
    report = surgeon.prune(model, FlapConfig(sparsity=0.3, metric=metric, search=search), calib, device="cpu",
                           progress=False)
    after = adapter.prunable_params()
    budget = math.floor(0.3 * before)
    assert report.params_before == before and report.params_after == after
    assert after < before  # physically smaller
    assert before - after <= budget
    assert budget - (before - after) < max(g.params_per_structure for g in groups)
    extra = report.extra["flap"]
    assert extra["removed_params"] == before - after and extra["budget_params"] == budget
    for g in adapter.structure_groups():
        assert g.count == extra["groups"][g.name]["kept"] >= 1
    for g in groups:  # every linear of a structure shrank by whole structures
        kept = extra["groups"][g.name]["kept"]
        for part in g.parts:
            lin = adapter.module(part.linear)
            assert (lin.out_features if part.axis == "row" else lin.in_features) == kept * part.block
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
    assert {"statistics", "scores", "search", "compress"} <= set(report.phases)


def test_prune_with_structure_level_standardisation(calib):
    model = make_llama(heads=8, kv_heads=4)
    report = surgeon.prune(model, FlapConfig(sparsity=0.3, standardize="structures"), calib, device="cpu",
                           progress=False)
    assert report.extra["flap"]["standardize"] == "structures"
    assert 0 < report.params_before - report.params_after <= math.floor(0.3 * report.params_before)
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


def test_llama_bias_compensation_keeps_the_model_reloadable(calib, tmp_path):
    """The config switches that add o_proj/down_proj biases also give q/k/v and gate/up zero biases: a
    model built from the pruned config has the pruned model's parameter names, and it reloads exactly."""
    from surgeon.io import load_pruned, save_pruned

    model = make_llama(heads=4, kv_heads=2)
    dense = make_llama(heads=4, kv_heads=2)
    surgeon.prune(model, FlapConfig(sparsity=0.3, search="ul-um"), calib, device="cpu", progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    with torch.device("meta"):
        fresh = type(model)(model.config)
    assert {n for n, _ in fresh.named_parameters()} == {n for n, _ in model.named_parameters()}
    layer = model.model.layers[0]
    assert torch.count_nonzero(layer.self_attn.q_proj.bias) == 0
    assert torch.count_nonzero(layer.mlp.down_proj.bias) > 0
    with torch.no_grad():
        out = model(calib).logits
        assert not torch.allclose(out, dense(calib).logits)
        reloaded = load_pruned(save_pruned(model, tmp_path / "m"))
        torch.testing.assert_close(reloaded(calib).logits, out)


def test_no_bias_switches_when_nothing_of_a_kind_is_removed(calib):
    model = make_llama(heads=2, kv_heads=1)  # one KV group per layer: attention cannot shrink
    surgeon.prune(model, FlapConfig(sparsity=0.2), calib, device="cpu", progress=False)
    assert not model.config.attention_bias and model.config.mlp_bias
    assert model.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_bias_compensation_refused_where_the_config_cannot_store_it(model_type, calib):
    model = make_llama(model_type=model_type)
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ValueError, match="bias_compensation=False"):
        surgeon.prune(model, FlapConfig(sparsity=0.3), calib, device="cpu", progress=False)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w)  # refused before any change
    report = surgeon.prune(model, FlapConfig(sparsity=0.3, bias_compensation=False), calib, device="cpu",
                           progress=False)
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
