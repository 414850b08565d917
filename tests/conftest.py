"""Shared fixtures: tiny random models built in-process (nothing downloads) and hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_llama(seed: int = 0, *, layers: int = 2, hidden: int = 32, mlp: int = 48, heads: int = 4, kv_heads: int = 2,
               vocab: int = 96, model_type: str = "llama"):
    """A tiny random Llama-family causal LM (GQA when ``kv_heads < heads``)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[model_type]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def make_opt(seed: int = 0, *, layers: int = 2, hidden: int = 32, ffn: int = 48, heads: int = 4, vocab: int = 96):
    """A tiny random OPT causal LM."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                                 num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=hidden)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def char_tokenizer():
    """A 96-token character tokenizer, the vocabulary size of the tiny test models."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_opt():
    return make_opt()


@pytest.fixture(params=["llama", "opt"])
def tiny_model(request):
    return make_llama() if request.param == "llama" else make_opt()


@pytest.fixture
def calib():
    """Calibration windows for the tiny models: 8 windows of 24 tokens."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (8, 24), generator=g)
