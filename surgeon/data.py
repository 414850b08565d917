"""Calibration and evaluation data: token windows from WikiText-2, local text, or a ``datasets`` split.

The protocol behind every number this library reports (see the README): calibrate on seeded random
windows of the WikiText-2 validation split (tokenised release, rows joined with a space), evaluate on the
raw test split (rows joined with ``"\\n\\n"``) in non-overlapping windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "as_token_windows",
    "calibration_windows",
    "find_wikitext2",
    "random_windows",
    "tokenize_text",
    "wikitext2_test_ids",
]

_WIKITEXT_FILES = ("wiki.valid.tokens", "test.raw.joined.txt")


def find_wikitext2(root: str | os.PathLike | None = None) -> Path:
    """Locate the WikiText-2 folder: ``root``, ``$SURGEON_WIKITEXT2``, or ``shared/data/wikitext-2`` beside
    or inside the current directory and the package's checkout."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    if os.environ.get("SURGEON_WIKITEXT2"):
        candidates.append(Path(os.environ["SURGEON_WIKITEXT2"]))
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidates += [base / "shared/data/wikitext-2", base.parent / "shared/data/wikitext-2"]
    for c in candidates:
        if all((c / f).is_file() for f in _WIKITEXT_FILES):
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"WikiText-2 files {_WIKITEXT_FILES} not found (looked in: {tried}); "
                            "pass root= or set SURGEON_WIKITEXT2")


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """One long 1-D LongTensor of token ids (no special tokens added mid-stream)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids.to(torch.long)


def random_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets of a 1-D token stream."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}")
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(
    tokenizer: Any,
    source: str | os.PathLike | Sequence[str] | Any = "wikitext2",
    *,
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_column: str = "text",
    root: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Calibration windows [n_samples, seqlen] from a named or given text source.

    ``source`` is ``"wikitext2"`` (the validation split of the local WikiText-2 copy), a path to a text
    file or a folder of ``.txt`` files, a list of strings, or a ``datasets.Dataset`` with a text column.
    Documents are joined with a space (the way the usual WikiText-2 train-split loaders do).
    """
    if isinstance(source, str) and source == "wikitext2":
        lines = (find_wikitext2(root) / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
        text = " ".join(lines)
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no calibration text at {p}")
        text = " ".join(f.read_text(encoding="utf-8") for f in files)
    elif hasattr(source, "column_names"):
        if text_column not in source.column_names:
            raise ValueError(f"dataset has no column {text_column!r} (columns: {source.column_names})")
        text = " ".join(source[text_column])
    elif isinstance(source, Sequence):
        text = " ".join(source)
    else:
        raise TypeError(f"unsupported calibration source {type(source).__name__}")
    return random_windows(tokenize_text(tokenizer, text), n_samples, seqlen, seed)


def wikitext2_test_ids(tokenizer: Any, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The raw WikiText-2 test split as one token stream (tokenised once, as the protocol requires)."""
    text = (find_wikitext2(root) / "test.raw.joined.txt").read_text(encoding="utf-8")
    return tokenize_text(tokenizer, text)


def as_token_windows(calibration: Any, *, min_tokens: int = 2) -> torch.Tensor:
    """Normalise what a user passes as calibration data to a LongTensor [N, L].

    Accepts a 2-D LongTensor, a list of equal-length 1-D tensors or lists of ids, or a
    ``datasets.Dataset`` with an ``input_ids`` column. Text must be tokenised first
    (:func:`calibration_windows`).
    """
    if hasattr(calibration, "column_names"):
        if "input_ids" not in calibration.column_names:
            raise ValueError("a calibration dataset needs an 'input_ids' column (tokenise it first, "
                             "or use surgeon.data.calibration_windows for text)")
        calibration = list(calibration["input_ids"])
    if isinstance(calibration, torch.Tensor):
        x = calibration
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in calibration]
        if not rows:
            raise ValueError("calibration data is empty")
        lengths = {r.numel() for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"calibration windows must have equal lengths, got {sorted(lengths)}")
        x = torch.stack(rows)
    else:
        raise TypeError(f"unsupported calibration data {type(calibration).__name__}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.numel() == 0:
        raise ValueError(f"calibration data must be [N, L] token ids, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise TypeError(f"calibration data must be integer token ids, got {x.dtype}")
    if x.shape[1] < min_tokens:
        raise ValueError(f"calibration windows have {x.shape[1]} tokens; at least {min_tokens} are needed")
    return x.to(torch.long)
