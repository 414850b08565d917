"""How much of a row the last N:M shot removes at once, on SmolLM2 (CPU): the pacing of the shots before it.

    python benchmarks/bench_nm_pacing.py [--allocations layer row] [--shots 4] [--out benchmarks/results/nm-pacing.json]

With ``nm_allocation="layer"`` the shots before the last move every linear toward its pattern at the same
pace, but within a linear the costs choose which rows: cheap rows reach M − N per group early and dear
rows wait for the last shot, which then removes a large share of them in one step. ``"row"`` paces every
row. For each allocation the row shares removed by the last shot (of the row's width; 2:4, K-FAC mask in
every shot so that only the pacing differs) are summarised. A small calibration (8 × 128 tokens): the
mechanism, not the protocol's numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import surgeon  # noqa: E402
from surgeon import data  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.methods.surgeon import SurgeonConfig  # noqa: E402
from surgeon.models import load_gguf  # noqa: E402
from surgeon.report import versions  # noqa: E402


def last_shot_shares(allocation: str, shots: int, calib: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    model, _ = load_gguf()
    linears = adapter_for(model).linears()
    kept = []
    cfg = SurgeonConfig(structure="2:4", shots=shots, cg_iterations=10, nm_allocation=allocation,
                        nm_final_mask="kfac")
    surgeon.prune(model, cfg, calib, device="cpu", batch_size=4, progress=False,
                  on_shot=lambda rec: kept.append({n: (lin.weight != 0).sum(1) for n, lin in linears.items()}))
    share = torch.cat([(kept[-2][n] - kept[-1][n]).float() / lin.weight.shape[1] for n, lin in linears.items()])
    return {"allocation": allocation, "shots": shots, "mean": round(float(share.mean()), 4),
            "p90": round(float(share.quantile(0.9)), 4), "max": round(float(share.max()), 4),
            "rows_over_a_quarter": round(float((share > 0.25).float().mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--allocations", nargs="+", default=["layer", "row"])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results" / "nm-pacing.json"))
    args = p.parse_args()
    _, tok = load_gguf()
    calib = data.calibration_windows(tok, n_samples=8, seqlen=128, seed=0)
    rows = []
    for a in args.allocations:
        rows.append(last_shot_shares(a, args.shots, calib))
        print(rows[-1], flush=True)
    result = {"benchmark": "nm-pacing", "command": "python benchmarks/bench_nm_pacing.py " + " ".join(sys.argv[1:]),
              "date": dt.date.today().isoformat(), "device": "cpu", "versions": versions(),
              "protocol": {"model": "SmolLM2-135M-Instruct", "calibration": "wikitext2-valid 8 x 128 seed 0",
                           "pruning": f"llm-surgeon 2:4, {args.shots} shots, cg_iterations 10, nm_final_mask kfac",
                           "share": "per row of every linear, the fraction of its width the last shot removes"},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(HERE))
    from table import render

    Path(args.out).with_suffix(".md").write_text(render(result))


if __name__ == "__main__":
    main()
