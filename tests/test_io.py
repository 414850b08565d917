"""Save and reload: every method and structure comes back with the same logits.

Unstructured and N:M models, and structured Llama-family models whose layers all have one shape, must load
with plain ``AutoModelForCausalLM.from_pretrained``; structured ones with layers of different sizes with
``surgeon.io.load_pruned``.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import make_llama, make_opt

import surgeon
from surgeon.io import SHAPES_KEY, is_structured, load_pruned, read_shapes, save_pruned
from surgeon.methods import METHODS

FAST = {"shots": 2, "correlation": "row", "max_correlate": 64}  # llm-surgeon settings small enough for CPU tests


def _prune(model, method, structure, calib, **kw):
    cfg_cls = METHODS[method][0]
    sparsity = 0.0 if ":" in structure else (0.25 if structure == "structured" else 0.5)
    extra = FAST if method == "llm-surgeon" else {}
    cfg = cfg_cls(sparsity=sparsity, structure=structure, **{**extra, **kw})
    return surgeon.prune(model, cfg, calib, device="cpu", progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [
    ("llama", "llm-surgeon", "structured"),
    ("llama", "llm-surgeon", "unstructured"),
    ("opt", "llm-surgeon", "structured"),
    ("opt", "llm-surgeon", "unstructured"),
    ("llama", "magnitude", "2:4"),
    ("opt", "magnitude", "structured"),
    ("llama", "flap", "structured"),
]


@pytest.mark.parametrize(("family", "method", "structure"), CASES, ids=["-".join(c) for c in CASES])
def test_round_trip_same_logits(tmp_path, calib, family, method, structure):
    if method not in METHODS:
        pytest.skip(f"{method} is not available")
    model = make_llama() if family == "llama" else make_opt()
    report = _prune(model, method, structure, calib)
    ids = calib[:2]
    expected = _logits(model, ids)
    save_pruned(model, tmp_path, report=report)
    assert (tmp_path / "report.json").is_file()
    shapes = surgeon.adapters.adapter_for(model).layer_shapes()
    stock_shapes = family == "llama" and all(s == shapes[0] for s in shapes)  # a stock config can say them
    assert is_structured(tmp_path) == (structure == "structured" and not stock_shapes)
    if structure == "structured":
        assert report.params_after < report.params_before
        back = load_pruned(tmp_path, attn_implementation="eager")
        for name, lin in surgeon.adapters.adapter_for(model).linears().items():
            assert back.get_submodule(name).weight.shape == lin.weight.shape
    else:
        # a stock transformers checkpoint: no surgeon code needed to load it
        assert SHAPES_KEY not in json.loads((tmp_path / "config.json").read_text())
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        zeros = sum(int((lin.weight == 0).sum()) for lin in surgeon.adapters.adapter_for(back).linears().values())
        assert zeros == report.params_before - report.params_after
    torch.testing.assert_close(_logits(back, ids), expected, rtol=0, atol=1e-5)


def test_structured_bf16_keeps_dtype_and_tied_embeddings(tmp_path, calib):
    model = make_llama()
    _prune(model, "magnitude", "structured", calib)
    model.to(torch.bfloat16)
    save_pruned(model, tmp_path)
    back = load_pruned(tmp_path, attn_implementation="eager")
    assert back.dtype == torch.bfloat16
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    # weights compare exactly (logits would not: ``model.to(bf16)`` also casts the rotary buffer, a fresh load does not)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())


def test_resave_replaces_stale_shards(tmp_path, calib):
    model = make_llama()
    save_pruned(model, tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _prune(model, "magnitude", "structured", calib)
    save_pruned(model, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".saving-*"))
    torch.testing.assert_close(_logits(load_pruned(tmp_path, attn_implementation="eager"), calib[:1]),
                               _logits(model, calib[:1]), rtol=0, atol=1e-5)


def test_gguf_marker_is_not_saved(tmp_path):
    """A model dequantised from GGUF still carries its quantization_config; the saved folder must not."""
    model = make_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    save_pruned(model, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert model.config.quantization_config == {"quant_method": "gguf"}  # the live model is left as it was
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_dense_model_has_no_shapes_key(tmp_path):
    model = make_opt()
    save_pruned(model, tmp_path)
    assert not is_structured(tmp_path)
    torch.testing.assert_close(_logits(load_pruned(tmp_path, attn_implementation="eager"), torch.arange(8)[None]),
                               _logits(model, torch.arange(8)[None]), rtol=0, atol=1e-5)


def _shrink(model, keep_groups, keep_channels):
    """Keep the given attention groups and MLP channels in every layer (index lists per layer)."""
    adapter = surgeon.adapters.adapter_for(model)
    for g in adapter.structure_groups():
        keep = (keep_groups if g.kind == "attn" else keep_channels)[g.layer]
        adapter.keep_structures(g, torch.tensor(keep))
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_uniform_structured_is_a_stock_checkpoint(tmp_path, model_type):
    """Every layer with the same (smaller) shape: plain from_pretrained loads it, with no surgeon key."""
    model = make_llama(model_type=model_type, layers=3, hidden=48, heads=6, kv_heads=3, mlp=40)
    fields = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", SHAPES_KEY)
    before = {k: getattr(model.config, k, None) for k in fields}
    # the same counts in every layer, different structures kept in each
    _shrink(model, [[0, 2], [1, 2], [0, 1]], [list(range(0, 40, 2)), list(range(20)), list(range(20, 40))])
    ids = torch.arange(12)[None] % 96
    expected = _logits(model, ids)
    save_pruned(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert SHAPES_KEY not in cfg and not is_structured(tmp_path)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"]) == (4, 2, 20, 8)
    assert {k: getattr(model.config, k, None) for k in fields} == before  # the live model's config is left as it was
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert back.model.layers[1].self_attn.q_proj.weight.shape == (32, 48)
    torch.testing.assert_close(_logits(back, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(load_pruned(tmp_path, attn_implementation="eager"), ids), expected, rtol=0, atol=1e-5)


def test_per_layer_shapes_keep_the_shapes_key(tmp_path):
    model = _shrink(make_llama(layers=2, hidden=48, heads=6, kv_heads=3, mlp=40), [[0, 2], [1]], [list(range(20)), list(range(20))])
    ids = torch.arange(12)[None]
    save_pruned(model, tmp_path)
    assert read_shapes(tmp_path) == [{"attn": 2, "mlp": 20}, {"attn": 1, "mlp": 20}]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["intermediate_size"]) == (6, 40)  # the dense counts, as before
    torch.testing.assert_close(_logits(load_pruned(tmp_path, attn_implementation="eager"), ids), _logits(model, ids),
                               rtol=0, atol=1e-5)


def test_uniform_opt_keeps_the_shapes_key(tmp_path):
    """OPT derives its head size from hidden_size / num_attention_heads: no stock config has fewer heads."""
    model = make_opt()
    adapter = surgeon.adapters.adapter_for(model)
    for g in adapter.structure_groups():
        adapter.keep_structures(g, torch.arange(g.count // 2))
    save_pruned(model, tmp_path)
    assert read_shapes(tmp_path) == [{"attn": 2, "mlp": 24}] * 2
    ids = torch.arange(8)[None]
    torch.testing.assert_close(_logits(load_pruned(tmp_path, attn_implementation="eager"), ids), _logits(model, ids),
                               rtol=0, atol=1e-5)


def test_uniform_then_per_layer_pruning_reloads(tmp_path):
    """A stock uniform folder, pruned again into per-layer shapes: the shapes are relative to its config."""
    model = _shrink(make_llama(layers=2, hidden=48, heads=6, kv_heads=3, mlp=40), [[0, 1], [1, 2]], [list(range(30))] * 2)
    save_pruned(model, tmp_path / "uniform")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", attn_implementation="eager").eval()
    _shrink(again, [[0, 1], [0]], [list(range(30)), list(range(10))])
    save_pruned(again, tmp_path / "per-layer")
    assert read_shapes(tmp_path / "per-layer") == [{"attn": 2, "mlp": 30}, {"attn": 1, "mlp": 10}]
    ids = torch.arange(12)[None]
    torch.testing.assert_close(_logits(load_pruned(tmp_path / "per-layer", attn_implementation="eager"), ids),
                               _logits(again, ids), rtol=0, atol=1e-5)
