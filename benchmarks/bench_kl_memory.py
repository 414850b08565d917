"""Peak memory of the distillation loss of ``lowrank_target="dense"``: all tokens at once vs one window at a time.

    python benchmarks/bench_kl_memory.py [--batch 4 --seqlen 1024 --vocab 49152] [--out benchmarks/results/kl-memory.json]

Each mode runs in a fresh process (CPU) and reports its peak resident memory above the bf16 logits it starts
from, for the loss and its backward pass. ``all-at-once`` is the formula before ``surgeon.lowrank.kl_to``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CHILD = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from surgeon.lowrank import kl_to
B, T, V = {batch}, {seqlen}, {vocab}
g = torch.Generator().manual_seed(0)
teacher = torch.randn(B, T, V, generator=g).bfloat16()
logits = torch.randn(B, T, V, generator=g).bfloat16().requires_grad_(True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {mode!r} == "windowed":
    loss = kl_to(teacher, logits)
else:
    s = F.log_softmax(logits.float(), -1).flatten(0, -2)
    t = F.log_softmax(teacher.float(), -1).flatten(0, -2)
    loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
loss.backward()
print(float(loss.detach()), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--out", default=str(HERE / "results" / "kl-memory.json"))
    args = p.parse_args()
    from surgeon.report import versions

    rows = []
    for mode in ("all-at-once", "windowed"):
        code = CHILD.format(root=str(HERE.parent), batch=args.batch, seqlen=args.seqlen, vocab=args.vocab, mode=mode)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        rows.append({"mode": mode, "loss": round(float(out[0]), 6), "peak_above_logits_gb": round(float(out[1]), 2)})
        print(rows[-1])
    result = {"benchmark": "kl-memory", "command": "python benchmarks/bench_kl_memory.py " + " ".join(sys.argv[1:]),
              "date": dt.date.today().isoformat(), "device": "cpu", "versions": versions(),
              "protocol": {"logits": f"{args.batch} x {args.seqlen} x {args.vocab}, bf16, random",
                           "memory": "peak resident set above the process's size after making the logits"},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    from table import render

    Path(args.out).with_suffix(".md").write_text(render(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
