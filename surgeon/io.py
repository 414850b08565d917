"""Saving pruned models so that they load again, and loading them.

Unstructured and N:M models are ordinary dense checkpoints with exact zeros: plain
``AutoModelForCausalLM.from_pretrained`` loads them. Structured pruning leaves layers of different sizes,
which a stock config cannot describe, so the per-layer sizes are stored in the config as
``surgeon_layer_shapes`` and :func:`load_pruned` rebuilds each layer at its size before loading the
weights. ``load_pruned`` also loads unpruned and dense-with-zeros checkpoints, so it is always safe to use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for

__all__ = ["load_pruned", "save_pruned", "SHAPES_KEY"]

SHAPES_KEY = "surgeon_layer_shapes"


def _dense_shapes(config: Any) -> list[dict[str, int]]:
    """Per-layer structure counts of an unpruned model with this config (built on the meta device)."""
    import transformers

    cfg = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != SHAPES_KEY})
    with torch.device("meta"):
        return adapter_for(transformers.AutoModelForCausalLM.from_config(cfg)).layer_shapes()


def save_pruned(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, report: Any = None,
                safe_serialization: bool = True) -> Path:
    """Write ``model`` (and optionally its tokenizer and run report) to ``path``; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapter = adapter_for(model)
    shapes = adapter.layer_shapes()
    if shapes != _dense_shapes(model.config):
        setattr(model.config, SHAPES_KEY, shapes)
    elif hasattr(model.config, SHAPES_KEY):
        delattr(model.config, SHAPES_KEY)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if report is not None:
        report.save(path / "report.json")
    return path


def load_pruned(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save_pruned` (structured or not) as a ``transformers`` model."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    shapes = getattr(config, SHAPES_KEY, None)
    if not shapes:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    model = transformers.AutoModelForCausalLM.from_config(config)
    adapter_for(model).apply_layer_shapes(shapes)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
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
