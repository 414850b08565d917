"""Model loading: the dequantised-GGUF cache (hit, miss, damaged entries, off) and hub-id errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, make_llama

from surgeon import models

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A file standing for a GGUF, and a dequantiser that builds a tiny Llama and counts its calls
    (the cache logic is the same whatever the file holds)."""
    path = tmp_path / "tiny.Q4.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)))
    calls: list[torch.dtype] = []

    def dequantise(p: Path, dtype: torch.dtype):
        assert p == path
        calls.append(dtype)
        return make_llama(seed=1).to(dtype), char_tokenizer()

    monkeypatch.setattr(models, "_from_gguf", dequantise)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return path, calls


def _entry(tmp_path: Path, path: Path) -> Path:
    return tmp_path / "cache" / "gguf" / models.file_sha256(path)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_miss_then_hit(fake_gguf, tmp_path):
    path, calls = fake_gguf
    m1, t1 = models.load_gguf(path)
    assert calls == [torch.float32]
    entry = _entry(tmp_path, path)
    marker = json.loads((entry / "surgeon-cache.json").read_text())
    assert marker["gguf_sha256"] == entry.name and marker["source"] == str(path)
    assert "model.safetensors" in marker["files"] and "tokenizer.json" in marker["files"]
    m2, t2 = models.load_gguf(path)
    assert calls == [torch.float32]  # loaded from the cache, not dequantised again
    assert _same_weights(m1, m2) and not m2.training
    assert m1.config._name_or_path == m2.config._name_or_path == "tiny.Q4"  # the GGUF, not the cache folder
    assert t2("hello").input_ids == t1("hello").input_ids
    m3, _ = models.load_gguf(path, dtype=torch.bfloat16)
    assert calls == [torch.float32] and next(m3.parameters()).dtype == torch.bfloat16
    assert _same_weights(m3, m1.to(torch.bfloat16))
    assert not list(entry.parent.glob(".*.tmp"))  # nothing left of the temporary folder


def test_the_key_is_the_file_content(fake_gguf, tmp_path):
    path, calls = fake_gguf
    models.load_gguf(path)
    path.write_bytes(path.read_bytes() + b"changed")
    models.load_gguf(path)
    assert len(calls) == 2
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate weights", "drop marker", "other key", "garbage config"])
def test_damaged_entry_is_rebuilt(fake_gguf, tmp_path, caplog, damage):
    path, calls = fake_gguf
    m1, _ = models.load_gguf(path)
    entry = _entry(tmp_path, path)
    if damage == "truncate weights":
        w = entry / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "drop marker":
        (entry / "surgeon-cache.json").unlink()
    elif damage == "other key":
        marker = json.loads((entry / "surgeon-cache.json").read_text())
        (entry / "surgeon-cache.json").write_text(json.dumps({**marker, "gguf_sha256": "0" * 64}))
    else:  # same size, unreadable content
        cfg = entry / "config.json"
        cfg.write_bytes(b"{" * cfg.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        m2, _ = models.load_gguf(path)
    assert len(calls) == 2 and "is damaged" in caplog.text
    assert _same_weights(m1, m2)
    m3, _ = models.load_gguf(path)  # the rebuilt entry serves the next load
    assert len(calls) == 2 and _same_weights(m1, m3)


def test_an_interrupted_write_is_not_an_entry(fake_gguf, tmp_path, monkeypatch):
    path, calls = fake_gguf

    def killed(src, dst):
        raise KeyboardInterrupt  # the writer dies between writing and renaming

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        models.load_gguf(path)
    monkeypatch.undo()
    monkeypatch.setattr(models, "_from_gguf", lambda p, dtype: (calls.append(dtype), (make_llama(seed=1), char_tokenizer()))[1])
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    assert not _entry(tmp_path, path).exists()
    models.load_gguf(path)
    assert len(calls) == 2 and _entry(tmp_path, path).is_dir()


def test_cache_off(fake_gguf, tmp_path, monkeypatch):
    path, calls = fake_gguf
    models.load_gguf(path, cache=False)
    models.load_gguf(path, cache=False)
    assert len(calls) == 2 and not (tmp_path / "cache").exists()
    monkeypatch.setenv(models.CACHE_ENV, "off")
    assert models.cache_dir() is None
    models.load_gguf(path)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="SURGEON_CACHE=off"):
        models.load_gguf(path, cache=True)


def test_unwritable_cache_only_warns(fake_gguf, tmp_path, monkeypatch, caplog):
    path, calls = fake_gguf
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        model, _ = models.load_gguf(path)  # the cache folder cannot even be created
    assert "could not write the model cache entry" in caplog.text and model is not None
    caplog.clear()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models.Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        model, _ = models.load_gguf(path)
    assert "could not write the model cache entry" in caplog.text and model is not None
    assert not _entry(tmp_path, path).exists()


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "surgeon"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "surgeon"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


# -- hub ids -----------------------------------------------------------------------------------------------
def _raising(*names: str):
    """A from_pretrained that fails with an OSError caused by exceptions of these class names."""
    def from_pretrained(*args, **kwargs):
        cause = None
        for name in reversed(names):
            e = type(name, (OSError,), {})(f"{name} happened")
            e.__cause__ = cause
            cause = e
        raise OSError("transformers could not load it") from cause
    return from_pretrained


@pytest.mark.parametrize("names, offline, expected", [
    (("RepositoryNotFoundError",), False, "no such model on the Hugging Face hub"),
    (("GatedRepoError", "RepositoryNotFoundError"), False, "gated model"),
    (("HFValidationError",), False, "not a valid Hugging Face hub id"),
    (("LocalEntryNotFoundError",), True, "switched off (HF_HUB_OFFLINE=1)"),
    (("LocalEntryNotFoundError",), False, "cannot be reached and the model is not in the local cache"),
    ((), False, "loading it as a Hugging Face hub id failed (transformers could not load it)"),
])
def test_hub_id_errors_say_why(monkeypatch, names, offline, expected):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _raising(*names))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load_pretrained("someone/some-model")
    assert str(e.value).startswith("'someone/some-model' is not a local folder or .gguf file, and ")
    assert expected in str(e.value)


def test_hub_id_offline_from_the_command_line(tmp_path):
    """For real: with the hub switched off and an empty cache, both commands exit with status 2 and a
    one-line error naming the id."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for args in (["eval", "HuggingFaceTB/SmolLM2-135M", "--quiet"],
                 ["prune", "--model", "HuggingFaceTB/SmolLM2-135M", "--method", "magnitude", "--quiet"]):
        out = subprocess.run([sys.executable, "-m", "surgeon", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "'HuggingFaceTB/SmolLM2-135M' is not a local folder or .gguf file" in out.stderr
        assert "HF_HUB_OFFLINE=1" in out.stderr and "Traceback" not in out.stderr


def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path):
    from surgeon.cli import load_model

    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model("./runs/missing")
