"""Saving pruned models so that they load again, and loading them.

Unstructured and N:M models are ordinary dense checkpoints with exact zeros: plain
``AutoModelForCausalLM.from_pretrained`` loads them, and so does every tool built on ``transformers``.
Structured pruning that leaves every layer of a Llama-family model with the same shape is saved as a stock
config (fewer heads, a smaller ``intermediate_size``, an explicit ``head_dim``): plain ``from_pretrained``
loads it too. Layers of different sizes are something a stock config cannot describe, so their per-layer
structure counts are stored in the config as ``surgeon_layer_shapes`` and :func:`load_pruned` rebuilds each
layer at its size before loading the weights (``from_pretrained`` would refuse the mismatched shapes).
``load_pruned`` also loads unpruned, uniform and dense-with-zeros checkpoints, so it is always safe to use.
The live model's config is left as it was: only the saved copy describes the new shapes.

Writes go to a hidden staging folder first and are moved into place file by file, and weight files left
by an earlier save into the same folder are removed, so a folder never mixes shards of two models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for

__all__ = ["SHAPES_KEY", "is_structured", "load_pruned", "read_shapes", "save_pruned"]

SHAPES_KEY = "surgeon_layer_shapes"

# Files that hold a model's weights; a save removes those of an older model in the same folder.
_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _dense_shapes(config: Any) -> list[dict[str, int]]:
    """Per-layer structure counts of an unpruned model with this config (built on the meta device)."""
    import transformers

    cfg = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != SHAPES_KEY})
    with torch.device("meta"):
        return adapter_for(transformers.AutoModelForCausalLM.from_config(cfg)).layer_shapes()


def _is_gguf_marker(qc: Any) -> bool:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return qc is not None and str(getattr(method, "value", method)).lower() == "gguf"


def _saved_config_fields(model: nn.Module) -> dict[str, Any]:
    """Config fields that the saved copy of ``model``'s config gets (a value of ``None`` drops the field).

    A GGUF ``quantization_config`` is dropped: the weights are plain dequantised tensors, and the marker
    would make ``from_pretrained`` look for a GGUF file that the folder does not have. Resized layers get
    stock head and width counts when they all have one shape and the family's config can say it, and
    ``surgeon_layer_shapes`` otherwise.
    """
    adapter = adapter_for(model)
    shapes = adapter.layer_shapes()
    fields: dict[str, Any] = {SHAPES_KEY: None}
    if _is_gguf_marker(getattr(model.config, "quantization_config", None)):
        fields["quantization_config"] = None
    if shapes == _dense_shapes(model.config):
        return fields
    stock = adapter.stock_config(shapes[0]) if all(s == shapes[0] for s in shapes) else None
    if stock is not None:
        fields.update(stock)
    else:
        fields[SHAPES_KEY] = shapes
    return fields


@contextlib.contextmanager
def _config_fields(config: Any, fields: dict[str, Any]):
    """Set (or, for ``None``, remove) config attributes for the duration of the block, then restore them."""
    old = {k: getattr(config, k) for k in fields if hasattr(config, k)}
    try:
        for k, v in fields.items():
            if v is None:
                if hasattr(config, k):
                    delattr(config, k)
            else:
                setattr(config, k, v)
        yield
    finally:
        for k in fields:
            if hasattr(config, k):
                delattr(config, k)
        for k, v in old.items():
            setattr(config, k, v)


def _move_into(staging: Path, path: Path) -> None:
    """Replace ``path``'s weight files by those in ``staging``, then move every staged file into ``path``."""
    for pattern in _WEIGHT_PATTERNS:
        for old in path.glob(pattern):
            if not (staging / old.name).exists():
                old.unlink()
    for f in sorted(staging.iterdir()):
        dest = path / f.name
        if f.is_dir():
            if dest.exists():
                shutil.rmtree(dest)
        os.replace(f, dest)


def save_pruned(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, report: Any = None,
                safe_serialization: bool = True, **save_kwargs: Any) -> Path:
    """Write ``model`` (and optionally its tokenizer and run report) to ``path``; returns the folder.

    Structured models with layers of different shapes get ``surgeon_layer_shapes`` in their config (reload
    them with :func:`load_pruned`); all others, same-shape structured Llama-family models included, are stock
    checkpoints. Extra keyword arguments go to ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields = _saved_config_fields(model)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
    try:
        with _config_fields(model.config, fields):
            model.save_pretrained(staging, safe_serialization=safe_serialization, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            report.save(staging / "report.json")
        _move_into(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _no_init() -> contextlib.AbstractContextManager:
    """Skip random initialisation of a model whose every weight is loaded right after."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def load_pruned(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                **kwargs: Any) -> nn.Module:
    """Load a model written by :func:`save_pruned` (structured or not) as a ``transformers`` model, in eval mode.

    ``dtype`` defaults to the saved one; other keyword arguments (e.g. ``attn_implementation="eager"``)
    go to ``from_pretrained`` / ``from_config``.
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    shapes = getattr(config, SHAPES_KEY, None)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not shapes:
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    with _no_init():
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    adapter_for(model).apply_layer_shapes(shapes)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint at {path} does not match its shapes: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def read_shapes(path: str | os.PathLike) -> list[dict[str, int]] | None:
    """Per-layer structure counts of a saved pruned model, or None for an unpruned layout."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get(SHAPES_KEY)


def is_structured(path: str | os.PathLike) -> bool:
    """Whether the model saved at ``path`` has resized layers (and so needs :func:`load_pruned`)."""
    return bool(read_shapes(path))
