"""Export pruned models to inference runtimes: a GGUF file for llama.cpp, per-layer shapes included.

    from surgeon.export import to_gguf
    to_gguf(model, tokenizer, "pruned.gguf", dtype="f16")

:mod:`surgeon.export.layout` says what llama.cpp runs (and refuses the rest, naming the layer);
:mod:`surgeon.export.vocab` copies or builds the tokenizer keys; :mod:`surgeon.export.writer` writes.
"""

from __future__ import annotations

from .layout import ExportError, GGUFLayout, LayerShape, gguf_layout
from .writer import DTYPES, to_gguf

__all__ = ["DTYPES", "ExportError", "GGUFLayout", "LayerShape", "gguf_layout", "to_gguf"]
