"""The memory plan counts exact sizes exactly and refuses runs that cannot fit; checkpointing keeps
K-FAC factors exactly as they are without it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_llama, make_opt

import surgeon
from surgeon import memory
from surgeon.adapters import adapter_for
from surgeon.curvature import estimate_kfac
from surgeon.methods.base import Context
from surgeon.methods.surgeon import SurgeonConfig
from surgeon.report import Report


def _unique_bytes(factors) -> int:
    seen, total = set(), 0
    for f in factors.values():
        for t in (f.A, f.G):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.mark.parametrize("make", [make_llama, make_opt], ids=["llama", "opt"])
def test_factor_bytes_are_exact(make, calib):
    model = make()
    adapter = adapter_for(model)
    factors = estimate_kfac(model, adapter.linears(), list(calib[:2].split(1)))
    assert memory.factor_bytes(adapter) == _unique_bytes(factors)
    some = sorted(adapter.linears())[:3]
    sub = estimate_kfac(model, {n: adapter.module(n) for n in some}, list(calib[:1].split(1)))
    assert memory.factor_bytes(adapter, some) == _unique_bytes(sub)
    p = memory.plan(model, SurgeonConfig(structure="structured"), calib.shape, device="cuda")
    assert p.summary["factor_gb"] * 2**30 == _unique_bytes(factors)


def test_plan_places_and_sizes_components():
    model = make_llama(layers=3, hidden=64, mlp=96, vocab=128)
    cfg = SurgeonConfig(structure="unstructured", sparsity=0.5)
    on_gpu = memory.plan(model, cfg, (16, 32), device="cuda", batch_size=4)
    offload = memory.plan(model, cfg, (16, 32), device="cuda", batch_size=4, offload_factors=True)
    names = {i.name: i for i in on_gpu.items}
    assert names["K-FAC factors"].where == "gpu" and names["K-FAC factors"].phases == memory.PHASES
    assert {i.name: i for i in offload.items}["K-FAC factors"].where == "host"
    assert offload.peak_gpu_bytes < on_gpu.peak_gpu_bytes
    assert offload.peak_host_bytes > on_gpu.peak_host_bytes
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert names["weights"].nbytes == weights  # tied embeddings counted once
    numel = sum(m.weight.numel() for m in adapter_for(model).linears().values())
    assert names["per-weight costs"].nbytes == 4 * numel
    assert names["logits and loss"].nbytes == 4 * 32 * 128 * (4 + 12)
    # the logits grow with the tokens of one pass, not with the calibration size
    bigger = memory.plan(model, cfg, (64, 32), device="cuda", batch_size=4)
    assert {i.name: i for i in bigger.items}["logits and loss"].nbytes == names["logits and loss"].nbytes
    # bf16 autocast halves what the compute dtype holds
    half = memory.plan(model, cfg, (16, 32), device="cuda", batch_size=4, autocast_dtype=torch.bfloat16)
    assert half.totals("gpu")["curvature"] < on_gpu.totals("gpu")["curvature"]
    # on a CPU device everything is host memory
    cpu = memory.plan(model, cfg, (16, 32), device="cpu")
    assert cpu.peak_gpu_bytes == 0 and all(i.where == "host" for i in cpu.items)
    assert on_gpu.fits(on_gpu.peak_gpu_bytes) and not on_gpu.fits(on_gpu.peak_gpu_bytes - 1)
    text = str(on_gpu)
    assert "K-FAC factors" in text and "peak gpu" in text and "curvature" in text
    json.dumps(on_gpu.to_dict())
    with pytest.raises(TypeError, match="K-FAC"):
        memory.plan(model, surgeon.MethodConfig(), (16, 32), device="cuda")
    # float64 sums: twice the factors more while the curvature passes run, nothing after
    exact = memory.plan(model, SurgeonConfig(structure="unstructured", sparsity=0.5, accumulate="float64"), (16, 32),
                        device="cuda", batch_size=4)
    sums = {i.name: i for i in exact.items}["float64 factor sums"]
    assert sums.nbytes == 2 * names["K-FAC factors"].nbytes and sums.phases == ("curvature",)
    gpu, gpu64 = on_gpu.totals("gpu"), exact.totals("gpu")
    assert gpu64["curvature"] - gpu["curvature"] == sums.nbytes and gpu64["update"] == gpu["update"]


def test_checkpointing_shrinks_the_activation_estimate():
    model = make_llama(layers=4, hidden=64, mlp=96)
    cfg = SurgeonConfig(structure="structured")
    off = memory.plan(model, cfg, (8, 64), device="cuda", batch_size=2)
    _enable_checkpointing(model)
    on = memory.plan(model, cfg, (8, 64), device="cuda", batch_size=2)
    assert on.summary["checkpointing"] and not off.summary["checkpointing"]
    assert on.totals("gpu")["curvature"] < off.totals("gpu")["curvature"]


def _ctx(model, calib, config, device="cpu"):
    return Context(model=model, adapter=adapter_for(model), config=config, calibration=calib,
                   device=torch.device(device), report=Report(method=config.method, config={}), progress=False)


def test_check_refuses_a_run_that_cannot_fit(calib, monkeypatch, caplog):
    model = make_llama()
    ctx = _ctx(model, calib, SurgeonConfig(structure="structured"), device="cuda")  # planned, never run
    with caplog.at_level(logging.INFO, logger="surgeon"):
        p = memory.check(ctx, device_total=2**40)
    assert p is not None and "memory plan" in caplog.text
    assert ctx.report.extra["memory_plan"]["peak_host_gb"] > 0
    with pytest.raises(memory.InsufficientMemoryError, match="offload_factors=True"):
        memory.check(ctx, device_total=1000)
    offloaded = _ctx(model, calib, SurgeonConfig(structure="structured", offload_factors=True), device="cuda")
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        memory.check(offloaded, device_total=1000)  # already offloaded: a warning, not a refusal
    assert "exceeds" in caplog.text
    monkeypatch.setenv(memory.CHECK_ENV, "warn")
    memory.check(ctx, device_total=1000)
    monkeypatch.setenv(memory.CHECK_ENV, "off")
    assert memory.check(ctx, device_total=1000) is None


def test_prune_refuses_before_touching_weights(calib, monkeypatch):
    model = make_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(memory, "usable_device_bytes", lambda device: 1000)
    with pytest.raises(memory.InsufficientMemoryError, match="exceeds"):
        surgeon.prune(model, SurgeonConfig(structure="unstructured", sparsity=0.3, shots=1), calib,
                      device="cpu", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- activation checkpointing -----------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_llama, make_opt], ids=["llama", "opt"])
def test_checkpointing_leaves_factors_unchanged(make, calib):
    model = make()
    adapter = adapter_for(model)
    batches = list(calib[:4].split(2))
    ref = estimate_kfac(model, adapter.linears(), batches)
    _enable_checkpointing(model)
    hooks = [(m, list(m._forward_hooks), list(m._forward_pre_hooks)) for m in model.modules()]
    with memory.activation_checkpointing(model, adapter.layers) as stats:
        assert not memory.checkpointing_requested(model)  # the collector sees no flag
        got = estimate_kfac(model, adapter.linears(), batches)
    assert stats.layers == len(adapter.layers)
    assert stats.recomputes == len(adapter.layers) * len(batches)  # the layers really were recomputed
    for name, f in ref.items():
        assert got[name].n_tokens == f.n_tokens  # not counted twice
        torch.testing.assert_close(got[name].A, f.A, rtol=1e-6, atol=0)
        torch.testing.assert_close(got[name].G, f.G, rtol=1e-6, atol=1e-7 * float(f.G.abs().max()))
    # everything is restored
    assert memory.checkpointing_requested(model)
    assert all("forward" not in layer.__dict__ for layer in adapter.layers)
    assert all(list(m._forward_hooks) == post and list(m._forward_pre_hooks) == pre for m, post, pre in hooks)


def test_checkpointing_is_a_no_op_when_not_requested(tiny_llama):
    with memory.activation_checkpointing(tiny_llama) as stats:
        pass
    assert stats.layers == 0


def test_prune_with_checkpointing_matches_prune_without(calib):
    cfg = SurgeonConfig(structure="structured", sparsity=0.2, shots=1)
    plain, ckpt = make_llama(), make_llama()
    _enable_checkpointing(ckpt)
    surgeon.prune(plain, cfg, calib, device="cpu", progress=False)
    surgeon.prune(ckpt, cfg, calib, device="cpu", progress=False)
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.shape == b.shape, n
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert memory.checkpointing_requested(ckpt)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_activation_estimate_is_close_to_what_backward_keeps(attn):
    """Bytes one decoder layer saves for backward, counted at the autograd pack hook, against the
    per-token estimate (the plan's approximation must stay within 20%)."""
    model = make_llama(layers=1, hidden=128, mlp=344, heads=8, kv_heads=8, vocab=128)
    model.config._attn_implementation = attn
    layer, seqlen = model.model.layers[0], 64
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, seqlen, 128, requires_grad=True)
    pos = torch.arange(seqlen)[None].expand(2, -1)
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)[None, None] if attn == "eager" else None
    for p in model.parameters():
        p.requires_grad_(False)  # as during curvature: only activations are kept, no weight gradients
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask, position_embeddings=model.model.rotary_emb(x, pos), position_ids=pos)
    measured = sum(storages.values()) / x[..., 0].numel()
    estimate, _ = memory._activation_bytes(adapter_for(model), seqlen, 4, 4)
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)


# -- automatic batch size ---------------------------------------------------------------------------

def _need(model, config, shape, b, device="cuda"):
    p = memory.plan(model, config, shape, device=device, batch_size=b, autocast_dtype=torch.bfloat16)
    return p.peak(p.on_device)[0]


def test_auto_batch_size_is_the_largest_that_fits():
    model = make_llama()
    cfg = SurgeonConfig(structure="structured", sparsity=0.2)
    shape = (16, 64)
    needs = [_need(model, cfg, shape, b) for b in range(1, 9)]
    assert needs == sorted(needs) and needs[0] < needs[-1]
    for b in (1, 3, 8):  # a device whose margin holds exactly the estimate of b windows
        total = int(needs[b - 1] / memory.AUTO_MARGIN) + 1
        got = memory.auto_batch_size(model, cfg, shape, device="cuda", autocast_dtype=torch.bfloat16, device_total=total)
        assert got["value"] == b and got["fits"] and got["auto"]
        assert got["estimated_peak_gb"] == pytest.approx(needs[b - 1] / memory.GiB, abs=1e-3)
        assert got["basis"] == "memory plan" and got["cap"] == memory.AUTO_BATCH_CAP["cuda"]
    tiny = memory.auto_batch_size(model, cfg, shape, device="cuda", device_total=needs[0] // 2)
    assert tiny["value"] == 1 and not tiny["fits"]  # check() then refuses, naming what would fit


def test_auto_batch_size_is_capped_by_device_and_windows():
    model = make_llama()
    cfg = SurgeonConfig(structure="unstructured", sparsity=0.5)
    big = 2**50
    assert memory.auto_batch_size(model, cfg, (64, 16), device="cuda", device_total=big)["value"] == 8
    assert memory.auto_batch_size(model, cfg, (64, 16), device="cpu", device_total=big)["value"] == 4
    assert memory.auto_batch_size(model, cfg, (3, 16), device="cuda", device_total=big)["value"] == 3
    assert memory.auto_batch_size(model, cfg, (64, 16), device="cuda", device_total=big, cap=2)["value"] == 2
    with pytest.raises(ValueError, match="at least 1"):
        memory.auto_batch_size(model, cfg, (64, 16), device="cuda", cap=0)


def test_auto_batch_size_of_layer_sequential_methods():
    model = make_llama()
    cfg = surgeon.WandaConfig(sparsity=0.5)
    shape = (16, 64)
    needs = [memory.sequential_bytes(model, shape, batch_size=b) for b in range(1, 9)]
    assert all(a < b for a, b in zip(needs, needs[1:]))
    assert needs[0] > memory._weight_bytes(model) + 16 * 64 * 32 * 4  # weights and every window's hidden state
    got = memory.auto_batch_size(model, cfg, shape, device="cuda", device_total=int(needs[4] / memory.AUTO_MARGIN) + 1)
    assert got["value"] == 5 and got["basis"] == "layer-sequential estimate"


def test_prune_without_batch_size_chooses_and_records_one(calib, caplog):
    model = make_llama()
    cfg = SurgeonConfig(structure="structured", sparsity=0.2, shots=1)
    with caplog.at_level(logging.INFO, logger="surgeon"):
        report = surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    chosen = report.extra["batch_size"]
    assert chosen["auto"] and 1 <= chosen["value"] <= memory.AUTO_BATCH_CAP["cpu"]
    assert chosen["value"] == 4  # 8 windows of a tiny model: the CPU cap
    assert f"calibration batch size {chosen['value']} (automatic" in caplog.text
    assert report.extra["memory_plan"]["batch_size"] == chosen["value"]  # the run used it
    given = surgeon.prune(make_llama(), cfg, calib, device="cpu", progress=False, batch_size=3)
    assert given.extra["batch_size"] == {"value": 3, "auto": False}
    assert given.extra["memory_plan"]["batch_size"] == 3
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
            surgeon.prune(make_llama(), cfg, calib, device="cpu", progress=False, batch_size=bad)
