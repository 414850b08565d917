"""Write a (pruned) Llama-family ``transformers`` model as a GGUF file that llama.cpp runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES
from torch import nn

from .layout import ExportError, GGUFLayout, gguf_layout, rope_rows
from .vocab import Vocab, fit_rows, vocab_from_gguf, vocab_from_tokenizer

__all__ = ["DTYPES", "to_gguf"]

logger = logging.getLogger("surgeon")

#: weight types of the matrices (norms, biases and rope factors are always f32, as llama.cpp expects)
DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}

Tensor = tuple[str, Callable[[], torch.Tensor]]


def _name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def _linear(kind: MODEL_TENSOR, layer: int, linear: nn.Linear, rope_heads: int | None = None) -> list[Tensor]:
    """A linear's weight (and bias), with rows reordered for rope when ``rope_heads`` is given."""
    fix = (lambda t: rope_rows(t, rope_heads)) if rope_heads else (lambda t: t)
    out = [(_name(kind, layer), lambda: fix(linear.weight))]
    if linear.bias is not None:
        out.append((_name(kind, layer, "bias"), lambda: fix(linear.bias)))
    return out


def _tensors(model: nn.Module, layout: GGUFLayout) -> list[Tensor]:
    """GGUF tensor names in llama.cpp's order, each with a function that yields its values when written."""
    inner = model.model
    out: list[Tensor] = [(_name(MODEL_TENSOR.TOKEN_EMBD), lambda: inner.embed_tokens.weight)]
    if layout.rope_factors is not None:
        out.append((_name(MODEL_TENSOR.ROPE_FREQS), lambda: layout.rope_factors))
    for i, (layer, shape) in enumerate(zip(inner.layers, layout.layers)):
        attn, mlp = layer.self_attn, layer.mlp
        out.append((_name(MODEL_TENSOR.ATTN_NORM, i), lambda layer=layer: layer.input_layernorm.weight))
        out += _linear(MODEL_TENSOR.ATTN_Q, i, attn.q_proj, rope_heads=shape.n_head)
        out += _linear(MODEL_TENSOR.ATTN_K, i, attn.k_proj, rope_heads=shape.n_head_kv)
        out += _linear(MODEL_TENSOR.ATTN_V, i, attn.v_proj)
        out += _linear(MODEL_TENSOR.ATTN_OUT, i, attn.o_proj)
        out.append((_name(MODEL_TENSOR.FFN_NORM, i), lambda layer=layer: layer.post_attention_layernorm.weight))
        out += _linear(MODEL_TENSOR.FFN_GATE, i, mlp.gate_proj)
        out += _linear(MODEL_TENSOR.FFN_UP, i, mlp.up_proj)
        out += _linear(MODEL_TENSOR.FFN_DOWN, i, mlp.down_proj)
    out.append((_name(MODEL_TENSOR.OUTPUT_NORM), lambda: inner.norm.weight))
    if not layout.tied:
        out.append((_name(MODEL_TENSOR.OUTPUT), lambda: model.get_output_embeddings().weight))
    return out


def _stored_dtype(t: torch.Tensor, matrix_dtype: Any) -> np.dtype:
    return np.dtype(matrix_dtype if t.ndim == 2 else np.float32)


def _as_array(t: torch.Tensor, matrix_dtype: Any) -> np.ndarray:
    t = t.detach().to("cpu", torch.float32)
    return np.ascontiguousarray(t.numpy().astype(_stored_dtype(t, matrix_dtype), copy=False))


def _hparams(writer: gguf.GGUFWriter, model: nn.Module, layout: GGUFLayout) -> None:
    config = model.config
    per_layer = (lambda f: [f(s) for s in layout.layers]) if layout.arch == "deci" else (lambda f: f(layout.layers[0]))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(len(layout.layers))
    writer.add_feed_forward_length(per_layer(lambda s: s.n_ff))
    writer.add_head_count(per_layer(lambda s: s.n_head))
    writer.add_head_count_kv(per_layer(lambda s: s.n_head_kv))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(layout.rope_base)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(layout.vocab_rows)


def _source_gguf(model: nn.Module) -> Path | None:
    """The GGUF that ``surgeon.models.load_gguf`` loaded this model from (SmolLM2 only), if it is here."""
    from ..models import SMOLLM2_GGUF, find_smollm2_gguf

    if Path(str(getattr(model.config, "_name_or_path", ""))).name != Path(SMOLLM2_GGUF).stem:
        return None
    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        return None


def _vocab(model: nn.Module, tokenizer: Any, source_gguf: str | os.PathLike | None, tokenizer_pre: str | None) -> Vocab:
    source = Path(source_gguf) if source_gguf is not None else _source_gguf(model)
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(f"source GGUF {source}: no such file")
        logger.info("tokenizer metadata copied from %s", source)
        return vocab_from_gguf(source)
    if tokenizer is None:
        raise ExportError("no tokenizer to export: pass a transformers tokenizer (byte-level BPE) or source_gguf= "
                          "(a GGUF file whose tokenizer.ggml.* keys to copy)")
    return vocab_from_tokenizer(tokenizer, pre=tokenizer_pre)


def to_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, dtype: str = "f16",
            source_gguf: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
            name: str | None = None) -> Path:
    """Write ``model`` (pruned or not, per-layer shapes included) as a GGUF file for llama.cpp; returns the path.

    Uniform shapes are written as llama.cpp's ``llama`` architecture, per-layer shapes as ``deci``
    (see :mod:`surgeon.export.layout`); a model llama.cpp cannot run is refused with an
    :class:`~surgeon.export.ExportError` before anything is written. ``dtype`` is ``"f32"`` or ``"f16"``
    for the weight matrices. The vocabulary is copied from ``source_gguf`` (by default the SmolLM2 GGUF
    when the model was loaded from it), else built from ``tokenizer`` (``tokenizer_pre``: llama.cpp's
    pre-tokenizer name, when it cannot be recognised). The file is written beside ``path`` and renamed
    into place, so a failed export leaves no partial file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    matrix_dtype, file_type = DTYPES[dtype]
    layout = gguf_layout(model)
    vocab = fit_rows(_vocab(model, tokenizer, source_gguf, tokenizer_pre), layout.vocab_rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = _tensors(model, layout)
    writer = gguf.GGUFWriter(tmp, layout.arch)
    try:
        writer.add_name(name or Path(str(getattr(model.config, "_name_or_path", "") or "model")).name)
        writer.add_file_type(int(file_type))
        _hparams(writer, model, layout)
        for key, (value, vtype, sub) in vocab.items():
            writer.add_key_value(key, value, vtype, sub)
        with torch.no_grad():
            for tname, get in tensors:
                t = get()
                stored = _stored_dtype(t, matrix_dtype)
                writer.add_tensor_info(tname, tuple(t.shape), stored, t.numel() * stored.itemsize)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, get in tensors:  # one tensor converted at a time
                writer.write_tensor_data(_as_array(get(), matrix_dtype))
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    logger.info("wrote %s (%s architecture, %s weights, %d layers)", path, layout.arch, dtype, len(layout.layers))
    return path
