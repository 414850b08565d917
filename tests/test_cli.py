"""The ``surgeon`` command: options built from the configs, prune/eval/report end to end, the output folder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import char_tokenizer, make_llama

from surgeon import corpora
from surgeon.cli import build_parser, config_from_args, main
from surgeon.io import load_pruned
from surgeon.methods import METHODS
from surgeon.report import Report

REPO = Path(__file__).resolve().parent.parent


def _text(n: int) -> str:
    return corpora.read_text("wikitext2-valid")[:n]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, calibration text and evaluation text."""
    root = tmp_path_factory.mktemp("cli")
    model = make_llama()
    model.save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(_text(6000), encoding="utf-8")
    (root / "eval.txt").write_text(_text(3000)[::-1], encoding="utf-8")
    return root


def prune_args(ws, out, *extra):
    return ["prune", "--model", str(ws / "tiny"), "--calibration", str(ws / "calib.txt"), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", "--quiet", "--output", str(out), *extra]


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_config_field_is_an_option(method, capsys):
    cfg_cls = METHODS[method][0]
    with pytest.raises(SystemExit):
        main(["prune", "--method", method, "--help"])
    squeezed = "".join(capsys.readouterr().out.split())
    parser = build_parser(method)
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in squeezed and "".join(f.metadata["help"].split()) in squeezed
        # every option parses its own default back to the same config
        value = [flag] if f.default is True else [flag.replace("--", "--no-", 1)] if f.default is False else [
            flag, "none" if f.default is None else str(f.default)]
        if f.name == "sparsity" and cfg_cls().structure_kind == "nm":
            continue
        ns = parser.parse_args(["prune", "--model", "m", "--method", method, *value])
        assert config_from_args(cfg_cls, ns) == cfg_cls(), f.name
    ns = parser.parse_args(["prune", "--model", "m", "--method", method])
    assert config_from_args(cfg_cls, ns) == cfg_cls()  # nothing given: the config's own defaults


def test_option_types():
    cls = METHODS["llm-surgeon"][0]
    parser = build_parser("llm-surgeon")
    ns = parser.parse_args(["prune", "--model", "m", "--method", "llm-surgeon", "--no-update", "--shots", "4",
                            "--damp-g", "none", "--structure", "2:4", "--damp-a", "0.05"])
    cfg = config_from_args(cls, ns)
    assert (cfg.update, cfg.shots, cfg.damp_g, cfg.damp_a, cfg.structure) == (False, 4, None, 0.05, "2:4")
    assert cfg.sparsity == 0.5  # implied by N:M
    ns = parser.parse_args(["prune", "--model", "m", "--method", "llm-surgeon", "--damp-g", "0.2", "--update"])
    assert config_from_args(cls, ns).damp_g == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--model", "m", "--method", "llm-surgeon", "--shots", "many"])


def test_module_entry_point_shows_method_help():
    out = subprocess.run([sys.executable, "-m", "surgeon", "prune", "--method", "llm-surgeon", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--max-correlate" in out.stdout and "--no-equalize" in out.stdout and "--resume" in out.stdout


def test_unknown_method_lists_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", "m", "--method", "nope"])
    assert e.value.code == 2
    assert "llm-surgeon" in capsys.readouterr().err


# -- prune, eval, report --------------------------------------------------------------------------------
def test_prune_eval_report(workspace, capsys):
    out = workspace / "run-magnitude"
    rc = main(prune_args(workspace, out, "--method", "magnitude", "--sparsity", "0.5", "--eval",
                         "--eval-data", str(workspace / "eval.txt")))
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "surgeon_config.json", "report.json",
            "sparsity.png"} <= names
    assert not any(n.startswith(".") or n == "checkpoint" for n in names)
    stdout = capsys.readouterr().out
    assert "magnitude unstructured" in stdout and "perplexity" in stdout and "seqlen 16" in stdout

    settings = json.loads((out / "surgeon_config.json").read_text())
    assert settings["run"]["config"]["method"] == "magnitude"
    assert settings["run"]["calibration"]["nsamples"] == 4
    report = Report.load(out / "report.json")
    assert abs(report.sparsity - 0.5) < 0.01
    ev = report.extra["eval"]
    assert ev["seqlen"] == 16 and ev["windows"] > 0

    # unstructured: a stock checkpoint; `surgeon eval` measures the same perplexity with the same protocol
    transformers.AutoModelForCausalLM.from_pretrained(out)
    assert main(["eval", str(out), "--seqlen", "16", "--data", str(workspace / "eval.txt"), "--json", "--quiet",
                 "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == ev["windows"]
    assert res["ppl"] == pytest.approx(ev["ppl"], rel=1e-5)

    (out / "sparsity.png").unlink()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "module type" in text and "mlp.down_proj" in text and "layer" in text
    assert (out / "sparsity.png").stat().st_size > 1000


def test_prune_structured_surgeon_with_shots(workspace, capsys):
    out = workspace / "run-surgeon"
    rc = main(prune_args(workspace, out, "--method", "llm-surgeon", "--structure", "structured", "--sparsity", "0.25",
                         "--shots", "2", "--correlation", "row", "--max-correlate", "64", "--eval-shots",
                         "--eval-data", str(workspace / "eval.txt")))
    assert rc == 0
    assert "load_pruned" in capsys.readouterr().out
    report = Report.load(out / "report.json")
    assert [s["shot"] for s in report.shots] == [1, 2]
    assert all(s["ppl"] > 0 for s in report.shots)
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in make_llama().parameters())
    assert main(["report", str(out / "report.json"), "--no-plot"]) == 0
    assert "est. loss" in capsys.readouterr().out


def test_token_id_calibration_and_rerun_semantics(workspace, tmp_path, capsys):
    torch.save(torch.randint(0, 96, (6, 20)), tmp_path / "ids.pt")
    args = ["prune", "--model", str(workspace / "tiny"), "--calibration", str(tmp_path / "ids.pt"), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", "--quiet", "--method", "wanda" if "wanda" in METHODS else "magnitude",
            "--output", str(tmp_path / "out")]
    assert main(args) == 0
    capsys.readouterr()
    # the same command again: refused, pointing at --resume / --overwrite
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume on a finished run: nothing to do
    assert main([*args, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # --overwrite starts again
    before = (tmp_path / "out" / "report.json").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "out" / "report.json").stat().st_mtime_ns != before


def test_smollm2_shortcut_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "smollm2" in out and "--method" in out and "methods:" in out


@pytest.mark.skipif(os.environ.get("SURGEON_SLOW") != "1", reason="loads SmolLM2 (set SURGEON_SLOW=1)")
def test_smollm2_magnitude_end_to_end(tmp_path):
    pytest.importorskip("gguf")
    rc = main(["prune", "--model", "smollm2", "--method", "magnitude", "--structure", "2:4", "--nsamples", "2",
               "--seqlen", "64", "--device", "cpu", "--quiet", "--output", str(tmp_path / "out")])
    assert rc == 0
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.distributed
def test_torchrun_two_ranks_write_the_model_of_one_process(workspace, tmp_path):
    """``torchrun -m surgeon prune`` on two gloo ranks: rank 0 alone writes, and the model it writes
    has the heads and channels of a one-process run, with the same weights up to rounding. The empirical
    Fisher: sampled labels are drawn per rank (the same distribution, another draw)."""
    def args(out):
        return prune_args(workspace, out, "--method", "llm-surgeon", "--structure", "structured", "--sparsity", "0.25",
                          "--shots", "2", "--accumulate", "float64", "--fisher", "empirical")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "surgeon", *args(two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("written to") == 1  # one rank printed the report
    assert main(args(one)) == 0

    assert Report.load(two / "report.json").extra["kept_structures"] == Report.load(one / "report.json").extra["kept_structures"]
    with torch.no_grad():
        for (name, a), (_, b) in zip(load_pruned(two).named_parameters(), load_pruned(one).named_parameters()):
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
