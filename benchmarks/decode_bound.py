"""What decode speedup the bytes allow: ``python benchmarks/decode_bound.py benchmarks/results/serving.json``.

A decode step reads every weight once and, in ``bench_serving``'s static cache, every slot of every layer's
KV cache (prompt + 1 slots per sequence, bf16). When the step is bound by memory traffic, its speedup
over dense cannot exceed the ratio of the bytes it reads. This prints that bound per row and batch beside
the measured speedups and what fraction of the bound they reach: for a pruned model whose weights shrink
but whose KV cache does not, the bound falls as the batch grows.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def step_bytes(row: dict, batch: int, slots: int, head_dim: int, elem: int = 2) -> int:
    """Weight bytes plus the K and V of every slot of every layer, for ``batch`` sequences."""
    kv_heads = sum(layer[1] for layer in row["layers"])
    return int(row["weight_bytes"]) + kv_heads * head_dim * 2 * elem * slots * batch


def bounds(d: dict, batches: tuple[int, ...] = (1, 16)) -> list[dict]:
    """Per row: the bound and the measured speedup at each batch, and the fraction of the bound reached.
    The head size and the slots come from the JSON's own ``model`` and ``protocol`` text."""
    hidden = int(re.search(r"hidden (\d+)", d["model"]).group(1))
    heads = int(re.search(r"(\d+) heads", d["model"]).group(1))
    head_dim = hidden // heads
    slots = int(re.search(r"(\d+) slots", d["protocol"]["decode"]).group(1))
    dense = next(r for r in d["rows"] if r["method"] == "dense")
    out = []
    for r in d["rows"]:
        rec = {"variant": r["variant"], "target": r["target"]}
        for b in batches:
            bound = step_bytes(dense, b, slots, head_dim) / step_bytes(r, b, slots, head_dim)
            measured = r.get(f"decode_speedup_b{b}")
            rec[f"bound_b{b}"] = round(bound, 3)
            rec[f"measured_b{b}"] = measured
            rec[f"of_bound_b{b}"] = None if measured is None else round(measured / bound, 3)
        out.append(rec)
    return out


def main(argv: list[str]) -> None:
    for path in argv:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = bounds(d)
        cols = list(rows[0])
        print(f"# {path}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
