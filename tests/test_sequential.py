"""The layer-sequential helper replays each block exactly as the model runs it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, make_opt

from surgeon.adapters import adapter_for
from surgeon.config import MethodConfig
from surgeon.methods.base import Context
from surgeon.report import Report
from surgeon.sequential import ColumnNorms, Gram, LayerInputs, Moments, collect, for_each_layer, output_error


def _ctx(model, calib, batch_size=3):
    return Context(model=model, adapter=adapter_for(model), config=MethodConfig(), calibration=calib,
                   device=torch.device("cpu"), report=Report(method="test", config={}), batch_size=batch_size,
                   progress=False)


def _final_norm(model):
    inner = model.model
    return inner.norm if hasattr(inner, "norm") else inner.decoder.final_layer_norm


@pytest.fixture(params=["llama", "opt"])
def model(request):
    return make_llama() if request.param == "llama" else make_opt()


@torch.no_grad()
def test_captured_inputs_match_hidden_states(model, calib):
    ctx = _ctx(model, calib)
    inputs = LayerInputs.capture(ctx)
    assert len(inputs) == 3 and inputs.tokens == calib.numel()
    assert len({id(e) for e in inputs.extra}) == 2  # batches of 3, 3, 2: one set of kwargs per shape
    kw = inputs.extra[0][1]
    assert all(kw[k] is None for k in ("cache", "past_key_values") if k in kw)
    ref = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(torch.cat(inputs.hidden), ref[0], rtol=0, atol=0)
    layers = ctx.adapter.layers
    for i, layer in enumerate(layers):
        inputs.run(layer)
        out = torch.cat(inputs.hidden)
        if i + 1 < len(layers):
            torch.testing.assert_close(out, ref[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_final_norm(model)(out), ref[-1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_for_each_layer_without_pruning_reproduces_last_hidden_state(model, calib):
    ctx = _ctx(model, calib, batch_size=4)
    seen = []
    last = {}

    def step(s):
        seen.append(s.index)
        stats = s.collect(Gram.of)
        names = list(s.linears)
        assert set(stats) == set(names)
        for g in s.groups:  # linears reading one input share one accumulator
            assert len({id(stats[n]) for n in g}) == 1
        assert all(st.n == calib.numel() for st in stats.values())
        last["inputs"] = s.inputs

    for_each_layer(ctx, step, offload=True)
    assert seen == list(range(len(ctx.adapter.layers)))
    inputs = last["inputs"]
    assert all(h.device.type == "cpu" for h in inputs.hidden)
    inputs.run(ctx.adapter.layers[-1])
    ref = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states[-1]
    torch.testing.assert_close(_final_norm(model)(torch.cat(inputs.hidden)), ref, rtol=1e-5, atol=1e-5)
    assert {"capture", "statistics", "forward"} <= set(ctx.report.phases)


@torch.no_grad()
def test_statistics_match_direct_computation(calib):
    model = make_llama()
    ctx = _ctx(model, calib)
    inputs = LayerInputs.capture(ctx)
    layer = ctx.adapter.layers[0]
    down = layer.mlp.down_proj
    xs = []
    h = down.register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    inputs.run(layer, update=False)
    h.remove()
    x = torch.cat(xs)
    lin = {"down": down}
    gram = collect(layer, inputs, lin, Gram.of)["down"]
    norms = collect(layer, inputs, lin, ColumnNorms.of)["down"]
    mom = collect(layer, inputs, lin, Moments.of)["down"]
    torch.testing.assert_close(gram.sum.double(), x.T @ x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms.norms.double(), x.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mom.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mom.variance().double(), x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mom.variance(unbiased=True).double(), x.var(0), rtol=1e-4, atol=1e-6)
    # the output error from the Gram matrix equals the one from the activations
    w0 = down.weight.double()
    w = w0 * (torch.rand_like(w0) > 0.5)
    direct = float(((x @ (w - w0).T) ** 2).sum() / ((x @ w0.T) ** 2).sum())
    assert output_error(w0, w, x.T @ x) == pytest.approx(direct, rel=1e-6)


def test_nonfinite_statistics_name_the_linear(tiny_llama, calib):
    """An activation that overflows only inside a block is caught in its statistics, with the layer's name."""
    import surgeon
    from surgeon.methods.wanda import WandaConfig

    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0] = 1e25  # finite outputs, squares overflow fp32
    with pytest.raises(ValueError, match=r"non-finite activations .*layers\.1\.mlp\.down_proj"):
        surgeon.prune(tiny_llama, WandaConfig(sparsity=0.5), calib, device="cpu", progress=False)
