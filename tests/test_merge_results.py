"""benchmarks/merge_results.py: later runs replace rows by (label, structure, target), each row keeps its run's
records, and the freshness check then judges every row by its own commit."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import merge_results  # noqa: E402


def _run(sha, rows, command="python bench"):
    return {"benchmark": "smollm2", "command": command, "date": "2026-12-01", "device": "gpu", "deterministic": False,
            "concurrent_jobs": 1, "versions": {"surgeon_git": sha, "torch": "x", "transformers": "y"},
            "protocol": {"calibration": "c", "eval": "e"}, "rows": rows}


def _row(label, structure, target, ppl):
    return {"label": label, "set": "main", "structure": structure, "target": target, "achieved": target,
            "calib_ppl": 1.0, "ppl": ppl, "ood_ppl": ppl, "wall_s": 1.0}


def test_new_rows_replace_by_key_and_keep_their_run():
    base = _run("aaa", [_row("flap", "structured", 0.9, 30.0), _row("admm", "unstructured", 0.5, 40.0)])
    new = _run("bbb", [_row("admm", "unstructured", 0.5, 33.0), _row("wanda", "unstructured", 0.5, 48.0)], "second")
    out = merge_results.merge(base, new)
    by = {(r["label"], r["structure"]): r for r in out["rows"]}
    assert len(out["rows"]) == 3
    assert by["flap", "structured"]["versions"]["surgeon_git"] == "aaa"
    assert by["admm", "unstructured"]["ppl"] == 33.0 and by["admm", "unstructured"]["versions"]["surgeon_git"] == "bbb"
    assert by["wanda", "unstructured"]["command"] == "second"


def test_rows_own_versions_win_and_file_is_rewritten(tmp_path):
    row = {**_row("dense", "none", 1.0, 21.6), "versions": {"surgeon_git": "ccc"}}
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(_run("aaa", [])))
    new.write_text(json.dumps(_run("bbb", [row])))
    assert merge_results.main([str(base), str(new)]) == 0
    out = json.loads(base.read_text())
    assert out["rows"][0]["versions"]["surgeon_git"] == "ccc"
    assert "dense" in base.with_suffix(".md").read_text()


def test_repeated_rows_of_one_configuration_stay_apart():
    base = _run("aaa", [_row("admm", "2:4", 0.5, 58.0)])
    reps = [{**_row("llm-surgeon 2:4", "2:4", 0.5, ppl), "repeat": k} for k, ppl in ((1, 51.0), (2, 50.0))]
    out = merge_results.merge(base, _run("bbb", reps))
    assert sorted((r["label"], r.get("repeat"), r["ppl"]) for r in out["rows"]) == [
        ("admm", None, 58.0), ("llm-surgeon 2:4", 1, 51.0), ("llm-surgeon 2:4", 2, 50.0)]
    again = merge_results.merge(out, _run("ccc", [{**_row("llm-surgeon 2:4", "2:4", 0.5, 49.0), "repeat": 2}]))
    assert {r.get("repeat"): r["ppl"] for r in again["rows"] if r["label"] != "admm"} == {1: 51.0, 2: 49.0}
