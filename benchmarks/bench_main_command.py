"""The README's main job as a user runs it, timed from the shell: model load, calibration, pruning, writing.

    python benchmarks/bench_main_command.py                 # GPU: the full 128 x 2048 protocol

Runs ``python -m surgeon prune --model smollm2 ...`` in a fresh process (twice: the first run also fills the
dequantised-model cache, the second is what every later run costs), then measures the written model's
perplexity on both evaluation texts, and writes ``benchmarks/results/main-command.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MAIN = ["-m", "surgeon", "prune", "--model", "smollm2", "--method", "llm-surgeon", "--structure", "structured",
        "--sparsity", "0.2"]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout + out.stderr


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/main-command", help="the pruned model's folder")
    p.add_argument("--extra", default="", help="options appended to the main command (e.g. '--nsamples 8 --seqlen 256')")
    p.add_argument("--out", default=str(HERE / "results" / "main-command.json"))
    args = p.parse_args(argv)

    import torch

    from surgeon.report import versions

    rows = []
    for run in ("first (fills the model cache)", "second (cache warm)"):
        shutil.rmtree(args.output, ignore_errors=True)
        cmd = [sys.executable, *MAIN, *shlex.split(args.extra), "--output", args.output]
        wall, log = timed(cmd)
        report = json.loads(Path(args.output, "report.json").read_text())
        rows.append({"method": "llm-surgeon", "structure": "structured", "target": 0.8, "target_kind": "size",
                     "achieved": round(report["params_after"] / report["params_before"], 5), "run": run,
                     "wall_s": round(wall, 1), "prune_wall_s": round(report["wall_s"], 1),
                     "batch_size": report.get("extra", {}).get("batch_size"),
                     "phases_s": {k: round(v["wall_s"], 2) for k, v in report.get("phases", {}).items()},
                     "command": shlex.join(["python", *MAIN, *shlex.split(args.extra), "--output", args.output])})
        print(json.dumps(rows[-1]), flush=True)
    for name, key in (("wikitext2", "ppl"), ("pydoc", "ood_ppl")):
        _, log = timed([sys.executable, "-m", "surgeon", "eval", args.output, "--data", name, "--json", "--quiet"])
        rows[-1][key] = round(json.loads(log.strip().splitlines()[-1])["ppl"], 3)
    out = {"benchmark": "main-command", "command": shlex.join(["python", *sys.argv]),
           "date": dt.date.today().isoformat(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "versions": versions(),
           "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
           "protocol": {"calibration": "the command's defaults (wikitext2-valid 128x2048 seed 0 unless --extra says)",
                        "eval": "wikitext2-test raw (ppl) and pydoc (ood_ppl), seqlen 2048",
                        "wall_s": "the whole command from the shell: start-up, model load, calibration, pruning, writing"},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
