"""Small, deterministic CPU runs on SmolLM2 that decide what the GPU sweep should measure.

    python benchmarks/bench_directions.py 32 256 '[{"label": "x", "config": {"structure": "structured", "sparsity": 0.1, "shots": 4}}]'
    python benchmarks/bench_directions.py --render   # benchmarks/results/directions-cpu.md from its JSON

Arguments: calibration windows, their length, and a JSON list of variants (``label``, ``method``
(default llm-surgeon; ``dense`` for the unpruned model), ``config``: fields of the method's config). The
calibration is ``N + 8`` seeded windows of the WikiText-2 validation split; the last 8 are held out of
pruning and give ``held`` (the perplexity settings are chosen on); ``ppl`` and ``ood`` are the first 12
windows of 512 tokens of the WikiText-2 test split and of the pydoc text. One JSON line per variant on
stdout. A CPU is deterministic, so differences between variants are real at this size; whether they
hold at the full protocol is for the GPU to show. Rows kept in ``directions-cpu.json`` carry their own
``versions`` (each ran at its own commit); ``--render`` writes the table with that commit beside each row.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import surgeon  # noqa: E402
from bench_smollm2 import evaluate_all  # noqa: E402
from surgeon import data  # noqa: E402
from surgeon.io import load_pruned, save_pruned  # noqa: E402
from surgeon.methods import METHODS  # noqa: E402
from surgeon.models import load_gguf  # noqa: E402

HELD, EVAL_WINDOWS, EVAL_SEQLEN = 8, 12, 512
RESULTS = HERE / "results" / "directions-cpu.json"
COLUMNS = ("calibration", "label", "held", "ppl", "ood", "s", "commit", "historical")


def render(path: Path = RESULTS) -> str:
    """The markdown table of a directions JSON: one row per variant, its commit from the row's own
    ``versions`` (else the file's); a row's ``historical_reason`` stays in the JSON, where the note explains it."""
    import table

    d = json.loads(path.read_text())
    rows = [{**{k: x for k, x in r.items() if k != "historical_reason"},
             "commit": (r.get("versions") or d["versions"])["surgeon_git"]} for r in d["rows"]]
    return table.render({**d, "rows": rows}, columns=COLUMNS)


def main(argv: list[str]) -> None:
    n, seqlen, variants = int(argv[0]), int(argv[1]), json.loads(argv[2])
    torch.manual_seed(0)
    model, tok = load_gguf()
    calib = data.calibration_windows(tok, n_samples=n + HELD, seqlen=seqlen, seed=0)
    texts = {"ppl": data.eval_ids(tok, "wikitext2")[: EVAL_WINDOWS * EVAL_SEQLEN],
             "ood": data.eval_ids(tok, "pydoc")[: EVAL_WINDOWS * EVAL_SEQLEN], "held": calib[n:].reshape(-1)}
    folder = tempfile.mkdtemp(prefix="surgeon-directions-")
    save_pruned(model, folder, tokenizer=tok)

    def ppl(m):
        return evaluate_all(m, texts, EVAL_SEQLEN, batch=4)

    for v in variants:
        m = load_pruned(folder, dtype=torch.float32)
        if v.get("method") == "dense":
            print(json.dumps({"label": v.get("label", "dense"), **ppl(m)}), flush=True)
            continue
        cls, _ = METHODS[v.get("method", "llm-surgeon")]
        t0 = time.time()
        surgeon.prune(m, cls(**v["config"]), calib[:n], device="cpu", batch_size=4, progress=False)
        print(json.dumps({"label": v["label"], "config": v["config"], "s": round(time.time() - t0), **ppl(m)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        RESULTS.with_suffix(".md").write_text(render())
    else:
        main(sys.argv[1:])
