"""Architecture adapters: the one place that knows where a model family keeps its prunable linears."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter, Part, StructureGroup, slice_linear
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter)

__all__ = ["ADAPTERS", "LlamaAdapter", "ModelAdapter", "OPTAdapter", "Part", "StructureGroup", "adapter_for",
           "slice_linear", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, or a ValueError naming the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls(model)
            if not adapter.linears():
                raise ValueError(f"model of type {model_type!r} has no prunable linear layers")
            return adapter
    raise ValueError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
