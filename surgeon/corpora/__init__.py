"""The texts that ship inside the package: calibration and evaluation data needing no download.

Each :class:`Corpus` is one frozen UTF-8 file beside this module, found with :mod:`importlib.resources`
(so an editable checkout and an installed wheel find it alike, from any working directory) and checked
against the sha256 of its bytes before use. Licences and provenance: ``README.md`` in this folder.

Text is read the way Python's text mode reads it (``\\r\\n`` and ``\\r`` become ``\\n``): the raw
WikiText-2 test file was published with CRLF line ends, and the protocol behind every reported number
tokenises it with them translated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["CORPORA", "Corpus", "CorpusDamagedError", "decode", "read_bytes", "read_text"]


class CorpusDamagedError(OSError):
    """A shipped file's bytes do not match its recorded sha256 (a damaged or edited install)."""


@dataclass(frozen=True)
class Corpus:
    """One shipped text: ``file`` relative to this package, ``sha256`` of its bytes."""

    name: str
    file: str
    sha256: str
    description: str
    licence: str


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("wikitext2-valid", "wikitext-2/wiki.valid.tokens",
           "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
           "WikiText-2 validation split, tokenised release (wikitext-2-v1), one row per line",
           "CC BY-SA 3.0"),
    Corpus("wikitext2-test", "wikitext-2/test.raw.joined.txt",
           "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77",
           "WikiText-2 raw test split (wikitext-2-raw-v1), its rows joined with \"\\n\\n\"",
           "CC BY-SA 3.0"),
    Corpus("pydoc", "pydoc/topics-python-3.11.7.txt",
           "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee",
           "Python 3.11.7 reference-documentation topics (pydoc_data.topics, values in sorted key order "
           "joined with \"\\n\\n\")",
           "PSF License"),
)}


def _corpus(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise KeyError(f"no shipped corpus {name!r}; shipped: {', '.join(sorted(CORPORA))}") from None


def read_bytes(name: str) -> bytes:
    """The bytes of shipped corpus ``name``, refused if they do not match the recorded sha256."""
    c = _corpus(name)
    data = resources.files(__name__).joinpath(c.file).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != c.sha256:
        raise CorpusDamagedError(f"the shipped copy of {name} ({c.file}) has sha256 {digest}, expected {c.sha256}; "
                                 "reinstall surgeon")
    return data


def decode(data: bytes) -> str:
    """UTF-8 text with universal newlines, as ``open(path, encoding="utf-8").read()`` returns it."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def read_text(name: str) -> str:
    """The text of shipped corpus ``name`` (checked, newlines translated)."""
    return decode(read_bytes(name))
