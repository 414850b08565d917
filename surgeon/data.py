"""Calibration and evaluation data: token windows from the shipped texts, local files, or a ``datasets`` split.

The protocol behind every number this library reports (see the README): calibrate on seeded random
windows of the WikiText-2 validation split (tokenised release, rows joined with a space), evaluate on the
raw test split (rows joined with ``"\\n\\n"``) and on an out-of-domain text (the Python reference
documentation, ``"pydoc"``) in non-overlapping windows. All three texts ship inside the package
(:mod:`surgeon.corpora`); ``root=`` or ``$SURGEON_WIKITEXT2`` points WikiText-2 at another copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import corpora

__all__ = [
    "CALIBRATION_SOURCES",
    "EVAL_TEXTS",
    "as_token_windows",
    "calibration_text",
    "calibration_windows",
    "eval_ids",
    "eval_text",
    "find_wikitext2",
    "held_out_windows",
    "hub_text",
    "is_named_source",
    "load_token_ids",
    "random_windows",
    "tokenize_text",
    "wikitext2_test_ids",
    "window_starts",
]

WIKITEXT2_ENV = "SURGEON_WIKITEXT2"
_WIKITEXT_FILES = {"wikitext2-valid": "wiki.valid.tokens", "wikitext2-test": "test.raw.joined.txt"}

#: Named evaluation texts: name -> (shipped corpus, what reports call it).
EVAL_TEXTS = {
    "wikitext2": ("wikitext2-test", "wikitext2 test (raw, rows joined with \\n\\n)"),
    "pydoc": ("pydoc", "pydoc topics (Python 3.11.7 reference documentation, out of domain)"),
}

#: Named calibration sources (besides files, folders, strings, datasets and ``hub:NAME[:CONFIG[:SPLIT]]``).
CALIBRATION_SOURCES = {
    "wikitext2": "WikiText-2 validation split (tokenised release, shipped), rows joined with a space",
    "wikitext2-train": "WikiText-2 raw train split from the Hugging Face hub (datasets: wikitext, wikitext-2-raw-v1)",
}


def is_named_source(source: Any) -> bool:
    """Whether a calibration ``source`` is a name (:data:`CALIBRATION_SOURCES`, ``hub:...``), not a path."""
    return isinstance(source, str) and (source in CALIBRATION_SOURCES or source.startswith("hub:"))


def find_wikitext2(root: str | os.PathLike | None = None) -> Path | None:
    """The folder of an external WikiText-2 copy (``root``, else ``$SURGEON_WIKITEXT2``), or None for the
    copy shipped in the package. An override must hold both files: a wrong path is an error, not a
    silent fall-back to other data."""
    given = root if root is not None else os.environ.get(WIKITEXT2_ENV) or None
    if given is None:
        return None
    folder = Path(given).expanduser()
    missing = [f for f in _WIKITEXT_FILES.values() if not (folder / f).is_file()]
    if missing:
        how = "root=" if root is not None else f"${WIKITEXT2_ENV}"
        raise FileNotFoundError(f"WikiText-2 folder {folder} (from {how}) lacks {', '.join(missing)}; "
                                f"leave {how} unset to use the copy shipped with surgeon")
    return folder


def _wikitext2(corpus: str, root: str | os.PathLike | None) -> str:
    folder = find_wikitext2(root)
    if folder is None:
        return corpora.read_text(corpus)
    return corpora.decode((folder / _WIKITEXT_FILES[corpus]).read_bytes())


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
    return torch.stack([ids[s : s + seqlen] for s in window_starts(ids.numel(), n_samples, seqlen, seed).tolist()])


def window_starts(n_tokens: int, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Where :func:`random_windows` cuts its windows from a stream of ``n_tokens``: seeded offsets."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (n_samples,), generator=g)


def held_out_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0, *, length: int = 512) -> torch.Tensor:
    """Windows [k, length] of the stream ``ids`` that no calibration window of :func:`random_windows` (same
    ``n_samples``, ``seqlen``, ``seed``) touches: a held-out slice of the calibration text.

    Settings that regularise a fit (a damping, say) cannot be chosen on the windows the fit saw, which
    always prefer less of it; these are text of the same kind the method never read. Each stretch the
    calibration leaves uncovered gives as many whole windows as fit in it, in order.
    """
    ids = ids.reshape(-1)
    if length < 2:
        raise ValueError(f"need length >= 2, got {length}")
    covered = torch.zeros(ids.numel() + 1, dtype=torch.bool)
    covered[-1] = True  # a sentinel: the last stretch ends at the stream's end
    for s in window_starts(ids.numel(), n_samples, seqlen, seed).tolist():
        covered[s : s + seqlen] = True
    out, start = [], None
    for i, c in enumerate(covered.tolist()):
        if not c and start is None:
            start = i
        elif c and start is not None:
            out += [ids[b : b + length] for b in range(start, i - length + 1, length)]
            start = None
    if not out:
        raise ValueError(f"the calibration windows leave no stretch of {length} tokens of the text uncovered")
    return torch.stack(out)


def hub_text(path: str, name: str | None = None, split: str = "train", *, text_column: str = "text") -> str:
    """The ``text_column`` of a Hugging Face hub dataset split, documents joined with a space.

    Needs ``datasets`` and either the hub or the dataset in the local ``datasets`` cache; the error says
    which was missing instead of a long traceback from deep inside ``datasets``.
    """
    what = f"dataset {path!r}" + (f" ({name!r})" if name else "") + f", split {split!r}"
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{what} needs the datasets package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else f"{type(e).__name__}: {e}"
        raise FileNotFoundError(f"cannot load {what} from the Hugging Face hub or the local datasets cache ({why}); "
                                "the shipped calibration text is 'wikitext2'") from e
    return calibration_text(ds, text_column=text_column)


def _hub_spec(source: str) -> tuple[str, str | None, str]:
    """``hub:PATH[:CONFIG[:SPLIT]]`` -> (path, config or None, split; default train)."""
    parts = source.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 3:
        raise ValueError(f"calibration source {source!r}: expected hub:NAME[:CONFIG[:SPLIT]], "
                         "e.g. hub:wikitext:wikitext-2-raw-v1:train")
    path, config, split = (parts + ["", ""])[:3]
    return path, config or None, split or "train"


def calibration_text(
    source: str | os.PathLike | Sequence[str] | Any = "wikitext2",
    *,
    text_column: str = "text",
    root: str | os.PathLike | None = None,
) -> str:
    """The text of a calibration source, its documents joined with a space (as the usual WikiText-2
    loaders do); see :func:`calibration_windows` for the sources."""
    if isinstance(source, str) and source == "wikitext2":
        return " ".join(_wikitext2("wikitext2-valid", root).splitlines())
    if isinstance(source, str) and source == "wikitext2-train":
        return hub_text("wikitext", "wikitext-2-raw-v1", "train", text_column=text_column)
    if isinstance(source, str) and source.startswith("hub:"):
        path, config, split = _hub_spec(source)
        return hub_text(path, config, split, text_column=text_column)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            names = ", ".join(repr(n) for n in CALIBRATION_SOURCES)
            raise FileNotFoundError(f"no calibration text at {p} (a text file, a folder of .txt files, "
                                    f"hub:NAME[:CONFIG[:SPLIT]], or one of {names})")
        return " ".join(corpora.decode(f.read_bytes()) for f in files)
    if hasattr(source, "column_names"):
        if text_column not in source.column_names:
            raise ValueError(f"dataset has no column {text_column!r} (columns: {source.column_names})")
        return " ".join(source[text_column])
    if isinstance(source, Sequence):
        return " ".join(source)
    raise TypeError(f"unsupported calibration source {type(source).__name__}")


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

    ``source`` is ``"wikitext2"`` (the WikiText-2 validation split shipped with the package; ``root`` or
    ``$SURGEON_WIKITEXT2`` for another copy), ``"wikitext2-train"`` (the standard raw train split from
    the hub, needs ``datasets`` and network or its cache), ``"hub:NAME[:CONFIG[:SPLIT]]"`` (any hub
    dataset split with a ``text_column``), a path to a text file or a folder of ``.txt`` files, a list
    of strings, or a ``datasets.Dataset`` with a text column.
    """
    text = calibration_text(source, text_column=text_column, root=root)
    return random_windows(tokenize_text(tokenizer, text), n_samples, seqlen, seed)


def load_token_ids(path: str | os.PathLike) -> torch.Tensor:
    """Token ids saved with ``torch.save`` (a tensor, or a dict with ``input_ids``) or ``numpy.save``."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path))
    obj = torch.load(path, weights_only=True)
    if isinstance(obj, dict) and "input_ids" in obj:
        obj = obj["input_ids"]
    return torch.as_tensor(obj)


def eval_text(name: str, *, root: str | os.PathLike | None = None) -> str:
    """The text of a named evaluation set (:data:`EVAL_TEXTS`): ``"wikitext2"`` or ``"pydoc"``."""
    if name not in EVAL_TEXTS:
        raise KeyError(f"no evaluation text named {name!r}; named ones: {', '.join(EVAL_TEXTS)}")
    corpus = EVAL_TEXTS[name][0]
    return _wikitext2(corpus, root) if corpus in _WIKITEXT_FILES else corpora.read_text(corpus)


def eval_ids(tokenizer: Any, source: str | os.PathLike = "wikitext2", *,
             root: str | os.PathLike | None = None) -> torch.Tensor:
    """One 1-D token stream to measure perplexity on (tokenised once, as the protocol requires).

    ``source`` names a shipped text (``"wikitext2"``: raw test split; ``"pydoc"``: out-of-domain
    Python documentation) or is a path: a text file, or token ids saved as ``.pt``/``.npy``.
    :func:`surgeon.evaluate.perplexity` cuts it into non-overlapping windows.
    """
    if isinstance(source, str) and source in EVAL_TEXTS:
        return tokenize_text(tokenizer, eval_text(source, root=root))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {source}: no such file (or one of {', '.join(EVAL_TEXTS)})")
    if path.suffix in (".pt", ".npy"):
        return load_token_ids(path).reshape(-1).long()
    return tokenize_text(tokenizer, corpora.decode(path.read_bytes()))


def wikitext2_test_ids(tokenizer: Any, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The raw WikiText-2 test split as one token stream (``eval_ids(tokenizer, "wikitext2")``)."""
    return eval_ids(tokenizer, "wikitext2", root=root)


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
