"""GGUF export for llama.cpp: the layout checks, the rope row order, the tokenizer keys, and llama.cpp itself.

The llama.cpp tests run the exported file with ``llama_cpp`` (llama-cpp-python) and compare its logits
with ``transformers``'; they are skipped when ``llama_cpp`` (or SmolLM2's GGUF, whose tokenizer keys the
tiny models borrow) is missing, and fail instead when ``SURGEON_REQUIRE_LLAMA_CPP=1`` (set in CI). Tolerances: f32 weights, f32 KV cache, no flash attention:
max |logit difference| < 1e-4 (measured about 5e-7 on these models); f16 weights: < 5e-3.
"""

from __future__ import annotations

import copy
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import make_llama, make_opt
from hypothesis import given
from hypothesis import strategies as st

from surgeon import prune
from surgeon.adapters import adapter_for, slice_linear
from surgeon.cli import main
from surgeon.export import ExportError, gguf_layout, to_gguf
from surgeon.export.layout import rope_rows
from surgeon.export.vocab import vocab_from_gguf, vocab_from_tokenizer
from surgeon.io import save_pruned
from surgeon.methods import METHODS
from surgeon.models import find_smollm2_gguf

VOCAB = 49152  # SmolLM2's, so that its tokenizer keys fit the tiny models


def _missing(reason: str) -> None:
    """Skip, or fail where the environment promises everything (CI sets SURGEON_REQUIRE_LLAMA_CPP=1)."""
    if os.environ.get("SURGEON_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(f"SURGEON_REQUIRE_LLAMA_CPP=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:
        _missing(str(e))
    if not path.is_file():
        _missing(f"SURGEON_GGUF={path}: no such file")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        _missing(f"llama_cpp is not importable ({e}); `pip install llama-cpp-python` to run the llama.cpp tests")
    return llama_cpp


def _tiny(model_type="llama", layers=3):
    return make_llama(layers=layers, hidden=64, heads=4, kv_heads=2, mlp=96, vocab=VOCAB, model_type=model_type)


def _shrink(model, keep):
    """``keep[layer] = (attention groups kept, MLP channels kept)``."""
    adapter = adapter_for(model)
    for g in adapter.structure_groups():
        groups, width = keep[g.layer]
        adapter.keep_structures(g, torch.tensor(groups) if g.kind == "attn" else torch.arange(width))
    return model


PER_LAYER = {0: ([0, 1], 96), 1: ([1], 40), 2: ([0], 17)}


def _drop_query_slot(model, layer, slot=1):
    """Remove query slot ``slot`` of every KV group in ``layer`` (each group keeps its KV head and one
    query fewer), so that layers differ in queries per KV head, not only in head counts."""
    attn = model.model.layers[layer].self_attn
    hd, n_kv = attn.head_dim, attn.k_proj.out_features // attn.head_dim
    rep = attn.q_proj.out_features // (hd * n_kv)
    heads = torch.tensor([g * rep + q for g in range(n_kv) for q in range(rep) if q != slot])
    rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    attn.q_proj, attn.o_proj = slice_linear(attn.q_proj, rows=rows), slice_linear(attn.o_proj, cols=rows)
    attn.num_key_value_groups = rep - 1
    return model
UNIFORM = {0: ([1], 48), 1: ([0], 48), 2: ([1], 48)}


def _randomise_vectors(model):
    """Norm weights and biases away from 1 and 0, so that a misplaced one shows in the logits."""
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.ndim == 1:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.data.abs().mean() > 0.5 else 0.0))
    return model


# -- rope row order -----------------------------------------------------------------------------------
def _ggml_norm_rope(x, pos, base):
    """ggml's GGML_ROPE_TYPE_NORM on [heads, d]: dimensions 2j and 2j+1 rotate by pos * base^(-2j/d)."""
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * theta.cos() - x1 * theta.sin()
    out[..., 1::2] = x0 * theta.sin() + x1 * theta.cos()
    return out


@given(heads=st.integers(1, 4), half=st.integers(1, 8), pos=st.integers(0, 5000),
       base=st.sampled_from([10000.0, 100000.0, 500000.0]), seed=st.integers(0, 2**16))
def test_rope_rows_turn_rotate_half_into_adjacent_pairs(heads, half, pos, base, seed):
    """transformers' rope then the row reorder == the reorder then llama.cpp's rope (for queries and keys)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = 2 * half
    q = torch.randn(heads * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([pos * inv, pos * inv])
    hf, _ = apply_rotary_pos_emb(q.view(1, heads, 1, d), q.view(1, heads, 1, d), emb.cos()[None], emb.sin()[None])
    expected = rope_rows(hf.reshape(-1), heads)
    got = _ggml_norm_rope(rope_rows(q, heads).view(heads, d), pos, base).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_rope_rows_is_a_per_head_permutation():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)
    out = rope_rows(w, 2)
    assert out[:, 0].tolist() == [x * 3 for x in (0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15)]


# -- layout and refusals ------------------------------------------------------------------------------
def test_uniform_shapes_are_llama_and_per_layer_shapes_are_deci():
    assert gguf_layout(_tiny()).arch == "llama"
    uniform = gguf_layout(_shrink(_tiny(), UNIFORM))
    assert uniform.arch == "llama" and {(s.n_head, s.n_head_kv, s.n_ff) for s in uniform.layers} == {(2, 1, 48)}
    per_layer = gguf_layout(_shrink(_tiny(), PER_LAYER))
    assert per_layer.arch == "deci"
    assert [(s.n_head, s.n_head_kv, s.n_ff) for s in per_layer.layers] == [(4, 2, 96), (2, 1, 40), (2, 1, 17)]
    assert per_layer.tied and per_layer.head_dim == 16 and per_layer.rope_factors is None


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_refuses_a_layer_without_mlp_naming_it(tmp_path, smollm2_gguf):
    """llama.cpp's deci drops the attention output of a layer whose MLP width is 0: refused, not miscomputed."""
    model = _tiny()
    mlp = model.model.layers[1].mlp
    none = torch.zeros(0, dtype=torch.long)
    mlp.gate_proj, mlp.up_proj = slice_linear(mlp.gate_proj, rows=none), slice_linear(mlp.up_proj, rows=none)
    mlp.down_proj = slice_linear(mlp.down_proj, cols=none)
    model(input_ids=torch.arange(4)[None])  # transformers runs it
    with pytest.raises(ExportError, match=r"layer 1: MLP width 0.*llama\.cpp supports at least one MLP channel"):
        to_gguf(model, None, tmp_path / "m.gguf", source_gguf=smollm2_gguf)
    assert not list(tmp_path.iterdir())  # nothing written


def test_refuses_unequal_query_groups():
    model = _tiny()
    attn = model.model.layers[2].self_attn
    attn.q_proj = slice_linear(attn.q_proj, rows=torch.arange(48))  # 3 query heads over 2 KV heads
    attn.o_proj = slice_linear(attn.o_proj, cols=torch.arange(48))
    with pytest.raises(ExportError, match=r"layer 2: 3 query heads over 2 key/value heads.*divisible"):
        gguf_layout(model)


def test_refuses_other_families_and_rope_types():
    with pytest.raises(ExportError, match="model type 'opt'.*llama, mistral, qwen2"):
        gguf_layout(make_opt())
    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ExportError, match="q_norm"):
        gguf_layout(transformers.AutoModelForCausalLM.from_config(cfg))
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ExportError, match="rope type 'dynamic'.*default, linear, llama3"):
        gguf_layout(transformers.AutoModelForCausalLM.from_config(cfg))


def test_refuses_a_vocabulary_larger_than_the_embedding(tmp_path, smollm2_gguf):
    model = make_llama(vocab=96)
    with pytest.raises(ExportError, match="49152 tokens but the embedding only 96 rows"):
        to_gguf(model, None, tmp_path / "m.gguf", source_gguf=smollm2_gguf)
    with pytest.raises(ExportError, match="no tokenizer"):
        to_gguf(model, None, tmp_path / "m.gguf")


# -- the file -----------------------------------------------------------------------------------------
def _fields(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_per_layer_file_has_arrays_and_the_source_tokenizer(tmp_path, smollm2_gguf):
    model = _shrink(_tiny(), PER_LAYER)
    path = to_gguf(model, None, tmp_path / "m.gguf", dtype="f16", source_gguf=smollm2_gguf)
    f = _fields(path)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [4, 2, 2] and f["deci.attention.head_count_kv"] == [2, 1, 1]
    assert f["deci.feed_forward_length"] == [96, 40, 17] and f["deci.attention.key_length"] == 16
    source = _fields(smollm2_gguf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert f[key] == source[key]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["blk.2.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.2.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["blk.1.attn_q.weight"].shape) == [64, 32]  # ggml order: (inputs, outputs)


def test_vocab_built_from_tokenizer_json_matches_the_gguf(smollm2_gguf, smollm2_tokenizer):
    tok = smollm2_tokenizer
    built, source = vocab_from_tokenizer(tok), vocab_from_gguf(smollm2_gguf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert built[key][0] == source[key][0], key
    assert built["tokenizer.ggml.pre"][0] == "gpt-2"  # transformers rebuilt it with GPT-2's split only


def test_tokenizer_without_a_known_pre_tokenizer_must_name_it(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ExportError, match="tokenizer_pre="):
        vocab_from_tokenizer(tok)
    assert vocab_from_tokenizer(tok, pre="gpt-2")["tokenizer.ggml.pre"][0] == "gpt-2"


# -- llama.cpp ----------------------------------------------------------------------------------------
def _llama_cpp_logits(llama_cpp, path, ids):
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, flash_attn=False,
                          type_k=0, type_v=0)  # f32 KV cache (ggml type 0), so that f32 weights compare tightly
    llm.eval(ids.tolist())
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].double().numpy()


CASES = {
    "uniform": (lambda: _shrink(_tiny(), UNIFORM), "llama"),
    "per-layer": (lambda: _shrink(_tiny(), PER_LAYER), "deci"),
    "qwen2-biases-per-layer": (lambda: _randomise_vectors(_shrink(_tiny("qwen2"), PER_LAYER)), "deci"),
    "queries-per-kv-per-layer": (lambda: _drop_query_slot(_tiny(), 1), "deci"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_logits_match_transformers(tmp_path, llama_cpp, smollm2_gguf, case, dtype):
    build, arch = CASES[case]
    model = build()
    path = to_gguf(model, None, tmp_path / "m.gguf", dtype=dtype, source_gguf=smollm2_gguf)
    assert _fields(path)["general.architecture"] == arch
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))
    diff = np.abs(_llama_cpp_logits(llama_cpp, path, ids) - _hf_logits(model, ids))
    assert diff.max() < (1e-4 if dtype == "f32" else 5e-3), diff.max()


@pytest.mark.parametrize("method", ["llm-surgeon", "flap"])
def test_llama_cpp_runs_models_the_methods_pruned(tmp_path, llama_cpp, smollm2_gguf, method):
    """Real structured runs (FLAP folds removed channels into o_proj / down_proj biases)."""
    model = _tiny()
    dense_params = adapter_for(model).prunable_params()
    calib = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(0))
    extra = {"shots": 2, "max_correlate": 64} if method == "llm-surgeon" else {}
    prune(model, METHODS[method][0](sparsity=0.3, structure="structured", **extra), calib, device="cpu", progress=False)
    assert adapter_for(model).prunable_params() < dense_params
    if method == "flap":
        assert model.model.layers[0].mlp.down_proj.bias is not None
    path = to_gguf(model, None, tmp_path / "m.gguf", dtype="f32", source_gguf=smollm2_gguf)
    ids = calib[0]
    assert np.abs(_llama_cpp_logits(llama_cpp, path, ids) - _hf_logits(model, ids)).max() < 1e-4


def test_llama_cpp_runs_llama3_rope_untied_head_and_biases(tmp_path, llama_cpp, smollm2_gguf):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, attention_bias=True,
        mlp_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cfg._attn_implementation = "eager"
    model = _randomise_vectors(_shrink(transformers.AutoModelForCausalLM.from_config(cfg).eval(),
                                       {0: ([0, 1], 96), 1: ([1], 30)}))
    layout = gguf_layout(model)
    assert not layout.tied and layout.rope_factors is not None and not math.isclose(float(layout.rope_factors.max()), 1.0)
    path = to_gguf(model, None, tmp_path / "m.gguf", dtype="f32", source_gguf=smollm2_gguf)
    assert {"output.weight", "rope_freqs.weight"} <= {t.name for t in gguf.GGUFReader(path).tensors}
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(2))  # beyond the 16 original positions
    assert np.abs(_llama_cpp_logits(llama_cpp, path, ids) - _hf_logits(model, ids)).max() < 1e-4


def test_llama_cpp_tokenizes_like_transformers_with_a_built_vocab(tmp_path, llama_cpp, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = to_gguf(_tiny(layers=1), tok, tmp_path / "m.gguf", dtype="f16")  # vocabulary from tokenizer.json
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    text = "The pruned model runs in llama.cpp: 12 layers, 576 channels; isn't it?\n\nYes."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False).input_ids
    assert llm.token_eos() == tok.eos_token_id


def test_cli_export(tmp_path, capsys, smollm2_gguf):
    model = _shrink(_tiny(), PER_LAYER)
    save_pruned(model, tmp_path / "run")
    # the tokenizer comes from the GGUF the run started from
    (tmp_path / "run" / "surgeon_config.json").write_text(json.dumps({"run": {"model": str(smollm2_gguf)}}))
    assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "out.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out
    f = _fields(tmp_path / "out.gguf")
    assert f["general.architecture"] == "deci" and f["deci.feed_forward_length"] == [96, 40, 17]
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert f["tokenizer.ggml.pre"] == "smollm"

    save_pruned(make_opt(), tmp_path / "opt")  # a model llama.cpp's llama/deci cannot run: exit status 2
    assert main(["export", str(tmp_path / "opt"), "--gguf", str(tmp_path / "opt.gguf"), "--source-gguf", str(smollm2_gguf)]) == 2
    assert "model type 'opt'" in capsys.readouterr().err
    assert not (tmp_path / "opt.gguf").exists()
    assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "x.gguf"), "--source-gguf", str(tmp_path / "no.gguf")]) == 2
