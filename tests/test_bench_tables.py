"""benchmarks/bench_smollm2.py's tables: each run of a repeated configuration is a row of its own, and the
summary gives the mean and range of exactly the runs of one configuration."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_smollm2  # noqa: E402


def _row(label, ppl, ood, repeat=None, target=0.5):
    r = {"label": label, "set": "main", "structure": "2:4", "target": target, "achieved": target,
         "calib_ppl": ppl - 20, "held_ppl": ppl - 10, "ppl": ppl, "ood_ppl": ood, "wall_s": 100.0 + ppl}
    return r if repeat is None else {**r, "repeat": repeat}


def _cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_is_the_mean_and_range_of_each_repeated_configuration():
    rows = [_row("a", 50.0, 54.0, 1), _row("b", 58.0, 52.0, 1), _row("a", 52.0, 58.0, 2), _row("b", 58.0, 52.0, 2),
            _row("a", 51.0, 56.0, 3), _row("c", 40.0, 40.0)]
    lines = bench_smollm2.repeat_summary(rows, deterministic=False)
    body = {_cells(l)[0]: _cells(l) for l in lines if l.startswith("| ") and not l.startswith("| variant")}
    assert set(body) == {"a", "b"}  # a configuration run once has no summary
    assert body["a"][3] == "3"
    assert body["a"][6] == "51.000 [50.000–52.000]"
    assert body["a"][7] == "56.000 [54.000–58.000]"
    assert body["a"][4] == "31.000 [30.000–32.000]"
    assert body["a"][5] == "41.000 [40.000–42.000]"
    assert body["b"][6] == "58.000 [58.000–58.000]"
    assert "not deterministic" in "\n".join(lines)


def test_targets_and_errors_are_kept_out_of_each_others_summary():
    rows = [_row("a", 50.0, 54.0, 1), _row("a", 60.0, 64.0, 2, target=0.6), _row("a", 52.0, 56.0, 2),
            {"label": "a", "set": "main", "structure": "2:4", "target": 0.5, "repeat": 3, "error": "OOM"}]
    lines = bench_smollm2.repeat_summary(rows, deterministic=True)
    body = [_cells(l) for l in lines if l.startswith("| a ")]
    assert len(body) == 1 and body[0][3] == "2" and body[0][6] == "51.000 [50.000–52.000]"
    assert "(the same configuration run again; deterministic)" in "\n".join(lines)


def test_no_repeats_no_summary_and_each_run_is_labelled():
    assert bench_smollm2.repeat_summary([_row("a", 50.0, 54.0), _row("a", 51.0, 55.0)], deterministic=False) == []
    out = {"benchmark": "t", "command": "c", "device": "d", "versions": {"torch": "x", "transformers": "y",
           "surgeon_git": "z"}, "protocol": {"calibration": "c", "eval": "e"}, "deterministic": False,
           "concurrent_jobs": 1, "rows": [_row("a", 50.0, 54.0, 1), _row("a", 52.0, 58.0, 2)]}
    md = bench_smollm2.markdown(out)
    assert "| main | a [run 1] |" in md and "| main | a [run 2] |" in md
    assert "| a | 2:4 | 0.5 | 2 |" in md


def test_rows_before_the_held_out_measure_leave_its_cell_blank():
    old = {k: x for k, x in _row("a", 50.0, 54.0, 1).items() if k != "held_ppl"}
    rows = [old, {**old, "repeat": 2}]
    out = {"benchmark": "t", "command": "c", "device": "d", "versions": {"torch": "x", "transformers": "y",
           "surgeon_git": "z"}, "protocol": {"calibration": "c", "eval": "e"}, "deterministic": False,
           "concurrent_jobs": 1, "rows": rows}
    md = bench_smollm2.markdown(out)
    assert "| main | a [run 1] | 2:4 | 0.5 | 0.5 | 30.000 |  | 50.000 | 54.000 |" in md
    summary = [_cells(l) for l in bench_smollm2.repeat_summary(rows, deterministic=False) if l.startswith("| a ")]
    assert summary[0][5] == "" and summary[0][6] == "50.000 [50.000–50.000]"


@pytest.mark.parametrize("n", [0, -1])
def test_repeat_must_be_positive(n):
    with pytest.raises(SystemExit, match="--repeat must be >= 1"):
        bench_smollm2.main(["--set", "main", "--repeat", str(n)])
