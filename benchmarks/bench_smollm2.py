"""Every method on SmolLM2-135M-Instruct, one calibration set: perplexity in and out of domain, time, memory, speed.

    python benchmarks/bench_smollm2.py --suite all            # the committed table (GPU)
    python benchmarks/bench_smollm2.py --suite all --quick    # a minute-long smoke run on a CPU

Protocol (printed into the JSON): calibration = seeded random windows of the WikiText-2 validation split
(tokenised release), evaluation = raw test split in non-overlapping windows (``ppl``) and the same
windowing of the shipped out-of-domain text, Python's reference documentation (``ood_ppl``), fp32 weights.
Structured LLM Surgeon is run the way the paper reports intermediate targets: one linear schedule whose
shots each remove the same share, with perplexity measured when 90%, 80% and 70% of the size remain.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgeon  # noqa: E402
from surgeon import data, determinism, evaluate  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.methods import METHODS  # noqa: E402
from surgeon.models import load_gguf  # noqa: E402
from surgeon.report import versions  # noqa: E402


def tokens_per_s(model: torch.nn.Module, device: torch.device, seqlen: int, batch: int = 8, reps: int = 5) -> float:
    """Forward throughput in bf16 autocast on a fixed batch (inference speed of the pruned model)."""
    x = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        model(input_ids=x, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * seqlen * reps / (time.perf_counter() - t0)


def linear_params(model: torch.nn.Module, *, nonzero: bool = False) -> int:
    """Prunable linear weights of ``model`` (its non-zeros with ``nonzero``)."""
    adapter = adapter_for(model)
    if nonzero:
        return sum(int(torch.count_nonzero(m.weight)) for m in adapter.linears().values())
    return adapter.prunable_params()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        t0 = time.perf_counter()
        self.dense, self.tok = load_gguf()
        self.load_s = time.perf_counter() - t0
        self.calib = data.calibration_windows(self.tok, n_samples=args.nsamples, seqlen=args.seqlen, seed=0)
        # every perplexity is measured on both texts, with the same windowing
        self.texts = {"ppl": data.eval_ids(self.tok, "wikitext2"), "ood_ppl": data.eval_ids(self.tok, "pydoc")}
        if args.eval_windows:
            self.texts = {k: ids[: args.eval_windows * args.eval_seqlen] for k, ids in self.texts.items()}
        self.rows: list[dict[str, Any]] = []
        self.params0 = linear_params(self.dense)

    def fresh(self) -> torch.nn.Module:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return copy.deepcopy(self.dense).to(self.device)

    def ppl(self, model: torch.nn.Module) -> dict[str, float]:
        """``ppl`` (WikiText-2 test) and ``ood_ppl`` (pydoc) of ``model``, rounded for the table."""
        return {k: round(evaluate.perplexity(model, ids, seqlen=self.args.eval_seqlen, batch_size=self.args.eval_batch), 3)
                for k, ids in self.texts.items()}

    def windows(self, key: str) -> int:
        return self.texts[key].numel() // self.args.eval_seqlen

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys = ("method", "structure", "target", "achieved", "ppl", "ood_ppl", "wall_s", "peak_gpu_gb")
        print(" | ".join(f"{k}={row.get(k)}" for k in keys), flush=True)
        self.save()

    def save(self) -> None:
        a = self.args
        dev = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"
        out = {
            "benchmark": "smollm2", "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": dt.date.today().isoformat(), "device": dev, "versions": versions(),
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
            "protocol": {"calibration": f"wikitext2-valid (tokenised) {a.nsamples}x{a.seqlen} seed 0",
                         "eval": f"wikitext2-test raw, seqlen {a.eval_seqlen}, {self.windows('ppl')} windows",
                         "ood_eval": f"pydoc (Python 3.11.7 reference documentation, shipped in surgeon/corpora), "
                                     f"seqlen {a.eval_seqlen}, {self.windows('ood_ppl')} windows",
                         "target": "structured rows: fraction of prunable linear weights remaining (target_kind=size); "
                                   "others: fraction removed (target_kind=sparsity); embeddings and lm_head excluded",
                         "deterministic": a.deterministic},
            "rows": self.rows,
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))

    # -- runs ----------------------------------------------------------------------------------------
    def dense_row(self) -> None:
        m = self.fresh()
        t0 = time.perf_counter()
        ppl = self.ppl(m)
        tps = tokens_per_s(m, self.device, self.args.eval_seqlen)
        self.dense_tps = tps
        self.add({"method": "dense", "structure": "none", "target": 1.0, "target_kind": "size", "achieved": 1.0,
                  **ppl, "wall_s": round(time.perf_counter() - t0, 2), "params_after": self.params0,
                  "tokens_per_s_dense": round(tps)})
        del m

    def run(self, method: str, structure: str, sparsity: float, **kw: Any) -> None:
        """One pruning run; a failure becomes an ``error`` row so the rest of the suite still runs."""
        if self.args.only and f"{method}/{structure}" not in self.args.only.split(","):
            return
        try:
            self._run(method, structure, sparsity, **kw)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            self.add({"method": method, "structure": structure, "target": sparsity, "error": f"{type(e).__name__}: {e}"})

    def _run(self, method: str, structure: str, sparsity: float, *, label: str | None = None,
             checkpoints: dict[int, float] | None = None, **fields: Any) -> None:
        cfg_cls, _ = METHODS[method]
        cfg = cfg_cls(sparsity=sparsity if ":" not in structure else 0.0, structure=structure, **fields)
        model = self.fresh()
        t_start = time.perf_counter()
        eval_time = [0.0]

        def on_shot(rec: dict[str, Any]) -> None:
            if checkpoints and rec["shot"] in checkpoints:
                t0 = time.perf_counter()
                self.row_for(method, structure, model, checkpoints[rec["shot"]], label=label,
                             wall=t0 - t_start - eval_time[0], shot=rec["shot"], report=None, fields=fields)
                eval_time[0] += time.perf_counter() - t0

        report = surgeon.prune(model, cfg, self.calib, device=self.device, batch_size=self.args.batch_size,
                               progress=False, on_shot=on_shot if checkpoints else None)
        if not checkpoints:
            self.row_for(method, structure, model, sparsity, label=label, wall=report.wall_s, shot=None,
                         report=report, fields=fields)
        del model

    def row_for(self, method: str, structure: str, model: torch.nn.Module, sparsity: float, *, label: str | None,
                wall: float, shot: int | None, report: Any, fields: dict[str, Any]) -> None:
        structured = structure == "structured"
        params = linear_params(model, nonzero=not structured)
        achieved_sparsity = 1 - params / self.params0
        row: dict[str, Any] = {
            "method": method, "structure": structure,
            "target": round(1 - sparsity, 4) if structured else round(sparsity if ":" not in structure else achieved_sparsity, 4),
            "target_kind": "size" if structured else "sparsity",
            "achieved": round(1 - achieved_sparsity if structured else achieved_sparsity, 5),
            **self.ppl(model), "wall_s": round(wall, 2), "params_after": params,
        }
        if self.device.type == "cuda":
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        if structured:
            row["tokens_per_s_after"] = round(tokens_per_s(model, self.device, self.args.eval_seqlen))
            row["tokens_per_s_dense"] = round(self.dense_tps)
        if shot is not None:
            row["shot"] = shot
        if label:
            row["variant"] = label
        if fields:
            row["config"] = {k: v for k, v in fields.items()}
        if report is not None:
            row["phases_s"] = {k: round(v["wall_s"], 2) for k, v in report.phases.items()}
        self.add(row)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="all", choices=["structured", "unstructured", "all"])
    p.add_argument("--only", default="", help="comma-separated METHOD/STRUCTURE rows to run, e.g. "
                   "'llm-surgeon/2:4,k-obd/2:4' (with the dense row; default: the whole suite)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=0, help="evaluate on the first N windows only (0 = all)")
    p.add_argument("--shots", type=int, default=8, help="shots of unstructured / N:M LLM Surgeon")
    p.add_argument("--structured-step", type=float, default=0.025, help="size removed per structured shot")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny calibration and evaluation (smoke test)")
    p.add_argument("--deterministic", action="store_true",
                   help="prune and evaluate in surgeon.determinism.deterministic() (same numbers every run, slower)")
    p.add_argument("--out", default="benchmarks/results/smollm2.json")
    args = p.parse_args(argv)
    if args.quick:
        args.nsamples, args.seqlen, args.batch_size, args.eval_seqlen, args.eval_windows = 2, 128, 2, 128, 2
        args.shots, args.structured_step = 2, 0.1
        if args.out == p.get_default("out"):
            args.out = "benchmarks/results/smollm2-quick.json"
    with determinism.deterministic(args.deterministic):
        suite(args)
    print(f"wrote {args.out}")


def suite(args: argparse.Namespace) -> None:
    b = Bench(args)
    b.dense_row()
    if args.suite in ("structured", "all"):
        sizes = [0.9, 0.8, 0.7]
        n = round(0.3 / args.structured_step)
        checkpoints = {round((1 - s) / args.structured_step): 1 - s for s in sizes}
        b.run("llm-surgeon", "structured", 0.3, shots=n, checkpoints=checkpoints)
        for s in sizes:
            b.run("magnitude", "structured", round(1 - s, 4))
        for s in (0.8, 0.7):
            b.run("flap", "structured", round(1 - s, 4))
    if args.suite in ("unstructured", "all"):
        for structure in ("unstructured", "2:4"):
            b.run("llm-surgeon", structure, 0.5, shots=args.shots)
            for method in ("sparsegpt", "wanda", "admm", "magnitude"):
                b.run(method, structure, 0.5)
        for structure in ("unstructured", "2:4"):
            b.run("k-obd", structure, 0.5, shots=args.shots)
        for structure in ("unstructured", "2:4"):
            b.run("llm-surgeon", structure, 0.5, shots=args.shots, lowrank_rank=16, label="low-rank updates")


if __name__ == "__main__":
    main()
