"""The tokenizer part of a GGUF file (``tokenizer.ggml.*``): copied from the model's source GGUF, or built
from a Hugging Face byte-level BPE tokenizer.

Copying is exact (the same tokens, merges, types, special ids, pre-tokenizer name and chat template
that llama.cpp already ran). Building covers what llama.cpp calls the ``gpt2`` tokenizer model: a BPE
vocabulary over GPT-2's byte-to-character mapping, its merges, and a pre-tokenizer that llama.cpp knows by
name; the name is recognised from the tokenizer's split expressions, or given.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from .layout import ExportError

__all__ = ["Vocab", "fit_rows", "vocab_from_gguf", "vocab_from_tokenizer"]

#: key -> (value, value type, element type of an array or None)
Vocab = dict[str, tuple[Any, GGUFValueType, "GGUFValueType | None"]]

TOKENS, TYPES = gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE

# Split expressions of Hugging Face pre-tokenizers, as their tokenizer.json files spell them, and the
# llama.cpp pre-tokenizer that splits text the same way.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_DIGITS = r"\p{N}"
KNOWN_PRE = {(_GPT2,): "gpt-2", (_DIGITS, _GPT2): "smollm", (_LLAMA3,): "llama-bpe", (_QWEN2,): "qwen2"}


@functools.lru_cache(maxsize=2)
def _read_vocab(path: Path, mtime_ns: int, size: int) -> Vocab:  # the file's identity is part of the key
    reader = gguf.GGUFReader(path)
    out: Vocab = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            out[name] = (field.contents(), vtype, sub)
    return out


def vocab_from_gguf(path: str | os.PathLike) -> Vocab:
    """Every ``tokenizer.*`` key of a GGUF file, with its stored types (the last two files read are
    remembered: parsing a GGUF takes seconds)."""
    path = Path(path).resolve()
    stat = path.stat()
    out = dict(_read_vocab(path, stat.st_mtime_ns, stat.st_size))
    if TOKENS not in out:
        raise ExportError(f"{path} holds no tokenizer.ggml.tokens: no vocabulary to copy")
    return out


def _splits(pre: dict[str, Any] | None) -> list[str]:
    """The split expressions a Hugging Face pre-tokenizer applies, in order."""
    if not pre:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _splits(p)]
    if kind == "ByteLevel":
        return [_GPT2] if pre.get("use_regex", True) else []
    if kind == "Digits" and pre.get("individual_digits"):
        return [_DIGITS]
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex", pattern.get("String", ""))]
    return [f"<{kind}>"]


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        return isinstance(node, list) and any(has(v) for v in node)

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


def _special_flags(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when the tokenizer encodes with its special tokens."""
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    extra = len(with_special) > len(plain)
    return (extra and tokenizer.bos_token_id is not None and with_special[0] == tokenizer.bos_token_id,
            extra and tokenizer.eos_token_id is not None and with_special[-1] == tokenizer.eos_token_id)


def vocab_from_tokenizer(tokenizer: Any, *, pre: str | None = None) -> Vocab:
    """Build the keys from a ``transformers`` fast tokenizer holding a byte-level BPE model.

    ``pre`` is llama.cpp's name of the pre-tokenizer; by default it is recognised from the split
    expressions (GPT-2, SmolLM, Llama 3, Qwen2), and other tokenizers must name it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast tokenizer with a tokenizer.json; pass source_gguf= "
                          "(a GGUF file whose tokenizer.ggml.* keys to copy)")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise ExportError(f"the tokenizer is a {model.get('type')} model{'' if _is_byte_level(spec) else ' without byte-level pre-tokenization'}; "
                          "the export builds llama.cpp vocabularies from byte-level BPE tokenizers only (GPT-2 style): "
                          "pass source_gguf= (a GGUF file whose tokenizer.ggml.* keys to copy)")
    if pre is None:
        splits = tuple(_splits(spec.get("pre_tokenizer")))
        pre = KNOWN_PRE.get(splits)
        if pre is None:
            raise ExportError(f"cannot tell llama.cpp's name for this pre-tokenizer (split expressions {list(splits)}); "
                              f"pass tokenizer_pre= with llama.cpp's name for it (known here: {sorted(KNOWN_PRE.values())})")
    ids = {int(i): t for t, i in model["vocab"].items()}
    types = {i: TokenType.NORMAL for i in ids}
    for added in spec.get("added_tokens", []):
        ids[int(added["id"])] = added["content"]
        types[int(added["id"])] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    n = max(ids) + 1
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [int(types.get(i, TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out: Vocab = {
        gguf.Keys.Tokenizer.MODEL: ("gpt2", GGUFValueType.STRING, None),
        gguf.Keys.Tokenizer.PRE: (pre, GGUFValueType.STRING, None),
        TOKENS: (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        TYPES: (token_types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        gguf.Keys.Tokenizer.MERGES: (merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    }
    for key, tid in ((gguf.Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id), (gguf.Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id),
                     (gguf.Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id), (gguf.Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id)):
        if tid is not None:
            out[key] = (int(tid), GGUFValueType.UINT32, None)
    add_bos, add_eos = _special_flags(tokenizer)
    out[gguf.Keys.Tokenizer.ADD_BOS] = (add_bos, GGUFValueType.BOOL, None)
    out[gguf.Keys.Tokenizer.ADD_EOS] = (add_eos, GGUFValueType.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = (template, GGUFValueType.STRING, None)
    return out


def fit_rows(vocab: Vocab, rows: int) -> Vocab:
    """Pad the token list to the embedding's row count (unused placeholder tokens, as for a padded
    embedding); llama.cpp requires one token per row. Refuses a vocabulary larger than the embedding.
    The lists given are never changed (they may be remembered by :func:`vocab_from_gguf`)."""
    tokens, vtype, sub = vocab[TOKENS]
    if len(tokens) > rows:
        raise ExportError(f"the vocabulary has {len(tokens)} tokens but the embedding only {rows} rows: "
                          "the tokenizer does not belong to this model")
    if len(tokens) == rows:
        return vocab
    out = dict(vocab)
    out[TOKENS] = ([*tokens, *(f"[PAD{i}]" for i in range(len(tokens), rows))], vtype, sub)
    if TYPES in vocab:
        types, tvtype, tsub = vocab[TYPES]
        out[TYPES] = ([*types, *([int(TokenType.UNUSED)] * (rows - len(types)))], tvtype, tsub)
    return out
