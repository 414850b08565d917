"""Shipped texts (found without shared/ or environment variables, checked by sha256), named evaluation
texts, calibration sources and their errors."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import char_tokenizer, make_llama

from surgeon import corpora, data
from surgeon.evaluate import perplexity

REPO = Path(__file__).resolve().parent.parent
PACKAGE_CORPORA = REPO / "surgeon" / "corpora"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def streams(tok):
    """Every named evaluation text's token stream (tokenised once for the module)."""
    return {name: data.eval_ids(tok, name) for name in data.EVAL_TEXTS}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != data.WIKITEXT2_ENV}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


# -- the shipped files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_shipped_file_matches_its_recorded_checksum(name):
    c = corpora.CORPORA[name]
    raw = (PACKAGE_CORPORA / c.file).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == c.sha256
    assert corpora.read_bytes(name) == raw
    readme = (PACKAGE_CORPORA / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if f"`{c.file}`" in line and line.startswith("|"))
    assert c.sha256 in row and f"{len(raw):,}" in row, "corpora/README.md must give the file's size and sha256"


def test_text_is_read_with_universal_newlines():
    """The raw test file has CRLF line ends; the protocol tokenises it as text mode reads it."""
    c = corpora.CORPORA["wikitext2-test"]
    raw = (PACKAGE_CORPORA / c.file).read_bytes()
    assert b"\r\n" in raw
    with open(PACKAGE_CORPORA / c.file, encoding="utf-8") as f:
        assert corpora.read_text("wikitext2-test") == f.read()
    assert data.eval_text("wikitext2").count("\r") == 0


def test_damaged_copy_is_refused(monkeypatch):
    c = corpora.CORPORA["pydoc"]
    monkeypatch.setitem(corpora.CORPORA, "pydoc", corpora.Corpus(c.name, c.file, "0" * 64, c.description, c.licence))
    with pytest.raises(corpora.CorpusDamagedError, match="pydoc.*expected 0000"):
        data.eval_text("pydoc")


def test_unknown_corpus_lists_the_shipped_ones():
    with pytest.raises(KeyError, match="pydoc"):
        corpora.read_text("c4")


def test_pydoc_snapshot_is_the_one_its_readme_describes():
    """Rebuilding the snapshot from the standard library gives the file byte for byte on the Python
    it came from (other versions have other topics: the reason it is frozen)."""
    c = corpora.CORPORA["pydoc"]
    version = re.search(r"python-([\d.]+)\.txt$", c.file).group(1)
    if platform.python_version() != version:
        pytest.skip(f"snapshot of Python {version}; this is {platform.python_version()}")
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == c.sha256


def test_data_found_from_another_directory_without_shared_or_environment(tmp_path):
    """A process started elsewhere, with no SURGEON_WIKITEXT2 and no shared/ folder in sight, reads
    every shipped text from the package itself."""
    code = ("import json, surgeon.data as d, surgeon.corpora as c, importlib.resources as r; "
            "print(json.dumps({'where': str(r.files('surgeon.corpora')), 'override': str(d.find_wikitext2()), "
            "'lengths': {n: len(c.read_text(n)) for n in c.CORPORA}, "
            "'calibration': len(d.calibration_text('wikitext2')), 'pydoc': len(d.eval_text('pydoc'))}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert Path(res["where"]).resolve() == PACKAGE_CORPORA.resolve()
    assert res["override"] == "None"
    assert res["lengths"]["wikitext2-test"] == 1_294_336 and res["lengths"]["wikitext2-valid"] == 1_120_192
    assert res["pydoc"] == res["lengths"]["pydoc"] > 400_000
    assert res["calibration"] == res["lengths"]["wikitext2-valid"] - 1  # 3,760 rows joined by 3,759 spaces


# -- overrides --------------------------------------------------------------------------------------------
def _fake_wikitext(folder: Path, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.valid.tokens").write_text(valid, encoding="utf-8")
    (folder / "test.raw.joined.txt").write_bytes(test.encode("utf-8"))
    return folder


def test_wikitext_overrides_replace_the_shipped_copy(tmp_path, monkeypatch):
    root = _fake_wikitext(tmp_path / "a", "line one\nline two\n", "test\r\ntext")
    assert data.calibration_text("wikitext2", root=root) == "line one line two"
    assert data.eval_text("wikitext2", root=root) == "test\ntext"
    env_root = _fake_wikitext(tmp_path / "b", "from env\n", "env test")
    monkeypatch.setenv(data.WIKITEXT2_ENV, str(env_root))
    assert data.find_wikitext2() == env_root
    assert data.calibration_text("wikitext2") == "from env"
    assert data.calibration_text("wikitext2", root=root) == "line one line two"  # root= comes first
    assert data.eval_text("pydoc") == corpora.read_text("pydoc")  # the override is WikiText-2's only


def test_a_wrong_override_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"lacks wiki\.valid\.tokens, test\.raw\.joined\.txt.*root="):
        data.calibration_text("wikitext2", root=tmp_path)
    monkeypatch.setenv(data.WIKITEXT2_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"SURGEON_WIKITEXT2"):
        data.eval_ids(char_tokenizer(), "wikitext2")


# -- evaluation texts by name -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(data.EVAL_TEXTS))
def test_eval_ids_by_name_tokenise_the_shipped_text(tok, streams, name):
    ids = streams[name]
    assert ids.dtype == torch.long and ids.ndim == 1
    assert torch.equal(ids, data.tokenize_text(tok, data.eval_text(name)))
    assert 0.9 * len(data.eval_text(name)) < ids.numel() <= len(data.eval_text(name))  # about one id per character


def test_eval_ids_from_files(tok, tmp_path):
    (tmp_path / "e.txt").write_bytes(b"ab\r\ncd")
    assert data.eval_ids(tok, tmp_path / "e.txt").tolist() == data.tokenize_text(tok, "ab\ncd").tolist()
    torch.save(torch.arange(10).view(2, 5), tmp_path / "ids.pt")
    assert data.eval_ids(tok, str(tmp_path / "ids.pt")).tolist() == list(range(10))
    with pytest.raises(FileNotFoundError, match="wikitext2, pydoc"):
        data.eval_ids(tok, "c4")


def test_both_texts_use_the_same_windowing(streams):
    """Perplexity on either text is the mean NLL over its non-overlapping windows (tail dropped)."""
    model = make_llama()
    seqlen = 64
    for ids in streams.values():
        ids = ids[: 3 * seqlen + 17]
        windows = ids[: 3 * seqlen].view(3, seqlen)
        with torch.no_grad():
            logits = model(input_ids=windows).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        assert perplexity(model, ids, seqlen=seqlen, batch_size=2) == pytest.approx(float(nll.exp()), rel=1e-5)


# -- calibration sources ------------------------------------------------------------------------------
def test_calibration_sources(tok, tmp_path):
    w = data.calibration_windows(tok, "wikitext2", n_samples=3, seqlen=32, seed=1)
    assert w.shape == (3, 32)
    assert inspect.signature(data.calibration_windows).parameters["source"].default == "wikitext2"
    (tmp_path / "a.txt").write_text("x" * 100, encoding="utf-8")
    (tmp_path / "b.txt").write_text("y" * 100, encoding="utf-8")
    assert data.calibration_text(tmp_path) == "x" * 100 + " " + "y" * 100
    assert data.calibration_text(["one", "two"]) == "one two"
    with pytest.raises(FileNotFoundError, match="wikitext2-train"):
        data.calibration_text(tmp_path / "missing.txt")


@pytest.mark.parametrize("spec, parsed", [
    ("hub:wikitext:wikitext-2-raw-v1:validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
    ("hub:wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
    ("hub:roneneldan/TinyStories", ("roneneldan/TinyStories", None, "train")),
    ("hub:user/set::test", ("user/set", None, "test")),
])
def test_hub_spec(spec, parsed):
    assert data._hub_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["hub:", "hub::x", "hub:a:b:c:d"])
def test_bad_hub_spec(spec):
    with pytest.raises(ValueError, match=r"hub:NAME\[:CONFIG\[:SPLIT\]\]"):
        data._hub_spec(spec)


def test_hub_split_offline_is_a_clear_error(tmp_path):
    """``wikitext2-train`` comes from the hub; offline (and with an empty cache) the error says so
    and names the shipped alternative, instead of a traceback from inside datasets."""
    pytest.importorskip("datasets")
    code = ("import surgeon.data as d\n"
            "try:\n    d.calibration_text('wikitext2-train')\n"
            "except FileNotFoundError as e:\n    print('ERROR', e)\n")
    env = _clean_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERROR cannot load dataset 'wikitext' ('wikitext-2-raw-v1'), split 'train'")
    assert "offline mode is on" in out.stdout and "'wikitext2'" in out.stdout


@settings(max_examples=60, deadline=None)
@given(n=st.integers(20, 400), k=st.integers(1, 6), seqlen=st.integers(2, 40), length=st.integers(2, 30),
       seed=st.integers(0, 1000))
def test_held_out_windows_are_the_uncovered_text(n, k, seqlen, length, seed):
    """Against a numpy reference: every whole window of ``length`` that fits in a stretch no calibration
    window touches, in order, and nothing else."""
    ids = torch.arange(n) * 7 + 3  # every token names its position
    if n <= seqlen:
        return
    calib = data.random_windows(ids, k, seqlen, seed)
    covered = np.zeros(n, dtype=bool)
    for w in calib.numpy():
        covered[(w - 3) // 7] = True
    want, i = [], 0
    while i < n:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < n and not covered[j]:
            j += 1
        want += [ids[b : b + length].numpy() for b in range(i, j - length + 1, length)]
        i = j
    if not want:
        with pytest.raises(ValueError, match="uncovered"):
            data.held_out_windows(ids, k, seqlen, seed, length=length)
        return
    got = data.held_out_windows(ids, k, seqlen, seed, length=length).numpy()
    np.testing.assert_array_equal(got, np.stack(want))
    assert not covered[(got.reshape(-1) - 3) // 7].any()
