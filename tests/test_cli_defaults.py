"""What the command line does with no data or batch options: the shipped texts, both evaluation texts
by name, and a batch size chosen from the memory plan and recorded."""

from __future__ import annotations

import json
import math

import pytest
from conftest import char_tokenizer, make_llama

from surgeon import corpora, data
from surgeon.cli import build_parser, eval_sources, main
from surgeon.evaluate import perplexity
from surgeon.io import load_pruned
from surgeon.memory import AUTO_BATCH_CAP
from surgeon.report import Report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder with a character tokenizer (and nothing to calibrate on but the shipped text)."""
    root = tmp_path_factory.mktemp("defaults") / "tiny"
    make_llama().save_pretrained(root)
    char_tokenizer().save_pretrained(root)
    return root


def test_defaults_in_the_parser():
    ns = build_parser("llm-surgeon").parse_args(["prune", "--model", "m", "--method", "llm-surgeon"])
    assert ns.batch_size == "auto" and ns.calibration == "wikitext2" and ns.eval_data == "wikitext2,pydoc"
    ns = build_parser().parse_args(["prune", "--model", "m", "--method", "wanda", "--batch-size", "3"])
    assert ns.batch_size == 3
    assert eval_sources("wikitext2, pydoc,wikitext2") == ["wikitext2", "pydoc"]
    with pytest.raises(ValueError, match="at least one"):
        eval_sources(" , ")


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_batch_size_is_refused(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", "m", "--method", "wanda", "--batch-size", bad])
    assert e.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err


@pytest.fixture
def short_wikitext(tmp_path, monkeypatch):
    """The head of each WikiText-2 file through $SURGEON_WIKITEXT2: the same code path as the shipped
    copy (test_data.py checks that one), at a tenth of the tokenising time."""
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for corpus, name in data._WIKITEXT_FILES.items():
        (folder / name).write_text(corpora.read_text(corpus)[:40_000], encoding="utf-8")
    monkeypatch.setenv(data.WIKITEXT2_ENV, str(folder))
    return folder


def test_prune_with_default_calibration_auto_batch_and_both_evaluations(tiny, short_wikitext, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tiny), "--method", "llm-surgeon", "--structure", "structured",
               "--sparsity", "0.2", "--shots", "1", "--nsamples", "6", "--seqlen", "32", "--device", "cpu", "--quiet",
               "--eval", "--eval-seqlen", "128", "--eval-windows", "8", "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    report = Report.load(out / "report.json")
    assert report.extra["calibration_source"]["source"] == "wikitext2"
    chosen = report.extra["batch_size"]
    assert chosen["auto"] and chosen["value"] == AUTO_BATCH_CAP["cpu"]  # 6 windows of a tiny model
    assert f"batch size {chosen['value']} (chosen from the memory plan)" in stdout
    assert json.loads((out / "surgeon_config.json").read_text())["run"]["batch_size"] == "auto"

    evals = {e["source"]: e for e in report.extra["evals"]}
    assert list(evals) == ["wikitext2", "pydoc"] and report.extra["eval"] == evals["wikitext2"]
    model, tok = load_pruned(out), char_tokenizer()
    for name, ev in evals.items():
        ids = data.eval_ids(tok, name)
        assert ev["dataset"] == data.EVAL_TEXTS[name][1]
        assert ev["windows"] == 8 and ev["windows_available"] == ids.numel() // 128
        assert f"perplexity {ev['ppl']:.4f} ({ev['dataset']}, seqlen 128, 8 of {ids.numel() // 128} windows)" in stdout
        assert math.isfinite(ev["ppl"])
        assert ev["ppl"] == pytest.approx(perplexity(model, ids[: 8 * 128 + 5], seqlen=128), rel=1e-5)

    # `surgeon eval` takes the out-of-domain text by name and measures what --eval measured
    assert main(["eval", str(out), "--data", "pydoc", "--seqlen", "128", "--windows", "8", "--json",
                 "--quiet", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "pydoc" and res["windows"] == evals["pydoc"]["windows"]
    assert res["ppl"] == pytest.approx(evals["pydoc"]["ppl"], rel=1e-5)


def test_unknown_evaluation_text_is_refused_before_pruning(tiny, tmp_path, capsys):
    rc = main(["prune", "--model", str(tiny), "--method", "magnitude", "--sparsity", "0.5", "--nsamples", "2",
               "--seqlen", "16", "--device", "cpu", "--quiet", "--eval", "--eval-data", "wikitext2,c4",
               "--output", str(tmp_path / "out")])
    assert rc == 2 and "evaluation data c4: no such file (or one of wikitext2, pydoc)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_readme_main_job_is_what_ci_runs_and_parses():
    """.ci/newcomer runs the README's first command block as written; its `surgeon prune` must parse
    with this CLI and rely on the defaults (shipped data, automatic batch size)."""
    import importlib.util
    import shlex
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("newcomer", repo / ".ci" / "newcomer.py")
    newcomer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(newcomer)
    command = newcomer.main_job(repo / "README.md")
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    install = shlex.split(steps[2])
    assert install[:3] == ["pip", "install", "-e"] and install[3].startswith(".[")
    pyproject = (repo / "pyproject.toml").read_text()
    for extra in install[3][2:-1].split(","):
        assert f"\n{extra} = [" in pyproject, f"the README installs extra {extra!r}, which pyproject.toml lacks"
    prune = shlex.split(steps[-1])
    assert prune[:4] == ["python", "-m", "surgeon", "prune"]
    ns = build_parser(prune[prune.index("--method") + 1]).parse_args(prune[3:])
    assert ns.model == "smollm2" and ns.calibration == "wikitext2" and ns.batch_size == "auto"
    assert newcomer.output_of(command) == ns.output == "runs/smollm2-s80"


def test_named_calibration_sources_are_kept_by_name(tmp_path):
    from surgeon.cli import _calibration_identity

    assert _calibration_identity("wikitext2") == "wikitext2"
    assert _calibration_identity("wikitext2-train") == "wikitext2-train"
    assert _calibration_identity("hub:wikitext:wikitext-2-raw-v1") == "hub:wikitext:wikitext-2-raw-v1"
    assert _calibration_identity(str(tmp_path / "x.txt")) == str((tmp_path / "x.txt").resolve())
