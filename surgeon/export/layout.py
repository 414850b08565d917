"""What llama.cpp can run, checked against a (pruned) ``transformers`` model before anything is written.

Read from llama.cpp's sources (the version vendored by llama-cpp-python 0.3.36):

- The ``llama`` architecture reads ``llama.attention.head_count``, ``.head_count_kv`` and
  ``.feed_forward_length`` as arrays too, but builds every layer's tensors and graph with layer 0's
  values, so it runs uniform shapes only. Uniform models (unpruned, or pruned to one shape) are written
  as ``llama``, the architecture every llama.cpp-based runtime knows.
- The ``deci`` architecture (DeciLM, Llama-3.1-Nemotron-NAS) takes each layer's head count, KV head count
  and feed-forward width from those arrays, so per-layer shapes are written as ``deci``. Its quirks: the
  head size is read once (``attention.key_length``), so it is the same in every layer; a layer with zero
  KV heads but some query heads is a different block ("linear attention"); a layer with a feed-forward
  width of 0 drops that layer's attention output as well; the head size comes from layer 0's heads.
- Both share each KV head among ``n_head / n_head_kv`` consecutive query heads (as ``repeat_kv`` does),
  rotate adjacent pairs for rope (so query and key rows are reordered, see :func:`rope_rows`), take
  optional q/k/v/o and MLP biases, use ``output.weight`` or, when it is absent, the token embedding
  (tied embeddings), scale attention by ``1/sqrt(head_dim)``, and accept per-frequency rope factors
  (``rope_freqs.weight``: Llama-3 and linear scaling); no q/k norms (Qwen3) and no sliding window.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ExportError", "GGUFLayout", "LayerShape", "gguf_layout", "rope_freq_factors", "rope_rows"]

logger = logging.getLogger("surgeon")

#: model types whose decoder layers llama.cpp's llama and deci architectures compute exactly
MODEL_TYPES = ("llama", "mistral", "qwen2")
#: rope types whose frequencies are fixed per dimension (llama.cpp: base and ``rope_freqs`` factors)
ROPE_TYPES = ("default", "linear", "llama3")


class ExportError(ValueError):
    """The model (or one of its layers) has something the target runtime cannot run."""


@dataclass(frozen=True)
class LayerShape:
    n_head: int
    n_head_kv: int
    n_ff: int


@dataclass(frozen=True)
class GGUFLayout:
    """How a model is written: the llama.cpp architecture and the numbers its keys carry."""

    arch: str  # "llama" (one shape in every layer) or "deci" (per-layer shapes)
    layers: tuple[LayerShape, ...]
    head_dim: int
    hidden: int
    vocab_rows: int
    tied: bool
    rope_base: float
    rope_factors: torch.Tensor | None  # per rotated pair; None when every factor is 1

    @property
    def uniform(self) -> bool:
        return all(s == self.layers[0] for s in self.layers)


def _refuse(layer: int | None, what: str, supported: str) -> ExportError:
    where = f"layer {layer}: " if layer is not None else ""
    return ExportError(f"cannot export to llama.cpp: {where}{what}; llama.cpp supports {supported}")


def _rope_base(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise ExportError("the config names no rope_theta")
    return float(base)


def rope_freq_factors(model: nn.Module, head_dim: int, base: float) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs``: the default frequencies divided by the model's, per rotated pair
    (None when they are all 1). Refuses rope types whose frequencies change with the sequence length or
    that rescale attention (dynamic, YaRN, LongRoPE), which these architectures do not compute."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise _refuse(None, f"rope type {rope_type!r}", f"rope types {', '.join(ROPE_TYPES)} (fixed frequencies)")
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise _refuse(None, f"rope attention scaling {rotary.attention_scaling}", "unscaled rope attention")
    inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq).detach().double().cpu()
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if inv_freq.shape != default.shape:
        raise _refuse(None, f"rope over {2 * inv_freq.numel()} of {head_dim} head dimensions", "rope over the whole head")
    factors = default / inv_freq
    return None if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0) else factors.float()


def rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (or its bias) for llama.cpp's rope.

    ``transformers`` rotates dimension ``j`` of a head with dimension ``j + d/2`` (``rotate_half``);
    llama.cpp's llama and deci rotate dimensions ``2j`` and ``2j + 1``, at the same frequency ``j``. Rows
    ``j`` and ``j + d/2`` of each head therefore become rows ``2j`` and ``2j + 1``. Queries and keys are
    reordered alike, so their dot products, and the attention, are unchanged.
    """
    d = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _check_family(model: nn.Module) -> Any:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen3":
        raise _refuse(None, "qwen3 normalises queries and keys per head (q_norm, k_norm)",
                      f"Llama-family decoders without q/k norms ({', '.join(MODEL_TYPES)})")
    if model_type not in MODEL_TYPES:
        raise _refuse(None, f"model type {model_type!r}", f"these model types: {', '.join(MODEL_TYPES)}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise _refuse(None, f"MLP activation {act!r}", "SiLU-gated MLPs")
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)) and \
            window < getattr(config, "max_position_embeddings", window + 1):
        logger.warning("the model attends within a sliding window of %d tokens; llama.cpp's llama/deci attend to the "
                       "whole context, so outputs differ beyond %d tokens", window, window)
    return config


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """Check that llama.cpp can run ``model`` and say how it will be written (or raise :class:`ExportError`
    naming the layer and what llama.cpp supports)."""
    config = _check_family(model)
    layers = model.model.layers
    head_dim = int(layers[0].self_attn.head_dim)
    shapes = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if int(attn.head_dim) != head_dim:
            raise _refuse(i, f"head size {attn.head_dim} (layer 0: {head_dim})", "one head size in all layers")
        q, k = attn.q_proj.out_features, attn.k_proj.out_features
        if q % head_dim or k % head_dim or attn.v_proj.out_features != k or attn.o_proj.in_features != q:
            raise _refuse(i, f"projections of {q} query and {k} key rows do not make whole heads of {head_dim}",
                          "whole heads")
        n_head, n_kv, n_ff = q // head_dim, k // head_dim, mlp.gate_proj.out_features
        if n_head == 0 or n_kv == 0:
            raise _refuse(i, f"{n_head} query and {n_kv} key/value heads (transformers cannot run a layer without "
                          "heads, and llama.cpp reads the head size from layer 0's)", "at least one head group per layer")
        if n_head % n_kv:
            raise _refuse(i, f"{n_head} query heads over {n_kv} key/value heads",
                          "a whole number of query heads per key/value head (n_head divisible by n_head_kv)")
        if n_ff == 0:
            raise _refuse(i, "MLP width 0 (its deci architecture then drops the layer's attention output too)",
                          "at least one MLP channel per layer")
        if mlp.up_proj.out_features != n_ff or mlp.down_proj.in_features != n_ff:
            raise _refuse(i, "gate, up and down projections of different widths", "one MLP width per layer")
        shapes.append(LayerShape(n_head, n_kv, n_ff))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed or head.weight.data_ptr() == embed.data_ptr()
    base = _rope_base(config)
    layout = GGUFLayout(arch="llama", layers=tuple(shapes), head_dim=head_dim, hidden=int(config.hidden_size),
                        vocab_rows=int(embed.shape[0]), tied=tied, rope_base=base,
                        rope_factors=rope_freq_factors(model, head_dim, base))
    if not layout.uniform:
        layout = dataclasses.replace(layout, arch="deci")
    return layout
