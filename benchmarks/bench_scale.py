"""LLM Surgeon at Llama-2-7B shape on one GPU: wall time and memory per phase, beside the memory plan.

    python benchmarks/bench_scale.py              # the committed table: one H100, under 6 minutes
    python benchmarks/bench_scale.py --dry-run    # a tiny config on the CPU, under a minute

Model: ``LlamaForCausalLM`` of Llama-2-7B shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab
32000, untied lm_head) with seeded random weights, built directly on the GPU in bf16 (``--dtype``),
SDPA attention, gradient checkpointing on. Calibration: random token ids, ``--nsamples`` windows of
``--seqlen`` tokens (default 16 x 2048, seed 0), ``--batch-size`` windows per pass. Nothing is
evaluated: the numbers are speed and memory only.

Rows (each in a fresh process, so that peak host memory belongs to that row alone):
- ``structured``: one shot of ``--step`` (default 0.05: 95% of the size remains), factors offloaded
  to the host when the memory plan says they do not fit on the device (``--offload``).
- ``unstructured``: one shot of ``--step`` sparsity, factors offloaded, ``--correlation`` (default
  ``row``) and ``--unstructured-layers`` (default ``auto``: the most layers whose plan fits the GPU, all
  32 on an 80 GB H100, where the plan puts the peak at 52 GiB of GPU and 111 GiB of host memory; the
  per-weight costs wait on the host, so a 128 GiB host is the limit).

Each row records ``report.phases`` (curvature = forward/backward with K-FAC hooks, costs = inversions
and costs, threshold, update): ``wall_s``, ``peak_gpu_gb``, ``peak_host_gb``, and the plan's estimate
of each. A row gets what is left of ``--budget-s`` (default 330 s) and is recorded as timed out past it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
DRY_RUN = dict(nsamples=4, seqlen=64, batch_size=2, dtype="fp32", device="cpu", unstructured_layers="2")


def _model_config(args: argparse.Namespace, layers: int) -> Any:
    import transformers

    shape = dict(TINY if args.dry_run else LLAMA2_7B, num_hidden_layers=layers)
    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def _dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build(args: argparse.Namespace, layers: int, device: Any) -> Any:
    """Random-weight model built on ``device`` (no host copy of the weights, no host init cost)."""
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(_model_config(args, layers), dtype=_dtype(args.dtype))
        if args.checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    return model.eval()


def _surgeon_config(args: argparse.Namespace, row: str, offload: bool) -> Any:
    from surgeon.methods.surgeon import SurgeonConfig

    extra = {"correlation": args.correlation} if row == "unstructured" else {}
    return SurgeonConfig(sparsity=args.step, structure=row, shots=1, offload_factors=offload, seed=0, **extra)


def _plan(args: argparse.Namespace, row: str, layers: int, device: Any, offload: bool) -> Any:
    """The memory plan of a row, from shapes only (a model on the meta device)."""
    import torch
    import transformers

    from surgeon import memory

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = transformers.AutoModelForCausalLM.from_config(_model_config(args, layers), dtype=_dtype(args.dtype))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return memory.plan(meta, _surgeon_config(args, row, offload), (args.nsamples, args.seqlen), device=device,
                       batch_size=args.batch_size, autocast_dtype=autocast, checkpointing=args.checkpointing)


def run_row(args: argparse.Namespace, row: str) -> dict[str, Any]:
    """Build, plan and prune one row in this process; returns its JSON row."""
    import torch

    import surgeon
    import surgeon.methods.surgeon  # noqa: F401  (registers llm-surgeon)
    from surgeon import memory

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    usable = memory.usable_device_bytes(device)
    layers = _model_config(args, args.layers).num_hidden_layers
    if row == "unstructured":
        offload = True
        if args.unstructured_layers == "auto" and usable is not None:
            lo, hi = 1, layers  # the plan grows with the layers: the most that fit, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _plan(args, row, mid, device, True).fits(usable) else (lo, mid - 1)
            layers = lo
        elif args.unstructured_layers != "auto":
            layers = min(layers, int(args.unstructured_layers))
    else:
        offload = args.offload == "on" or (args.offload == "auto" and usable is not None
                                           and not _plan(args, row, layers, device, False).fits(usable))
    estimate = _plan(args, row, layers, device, offload)

    t0 = time.perf_counter()
    model = build(args, layers, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    cfg = _surgeon_config(args, row, offload)
    report = surgeon.prune(model, cfg, calib, device=device, batch_size=args.batch_size, progress=False)

    est = report.extra.get("memory_plan") or estimate.to_dict()  # the plan prune itself logged
    phases = {}
    for name, rec in report.phases.items():
        phases[name] = {"wall_s": round(rec["wall_s"], 3), "peak_gpu_gb": round(rec["peak_gpu_gb"], 3),
                        "peak_host_gb": round(rec["peak_host_gb"], 3),
                        "estimate_gpu_gb": round(est["phases_gpu_gb"].get(name, 0.0), 3),
                        "estimate_host_gb": round(est["phases_host_gb"].get(name, 0.0), 3)}
    structured = row == "structured"
    remaining = report.params_after / report.params_before
    return {
        "method": "llm-surgeon", "structure": row,
        "target": round(1 - args.step, 6) if structured else args.step,
        "target_kind": "size" if structured else "sparsity",
        "achieved": round(remaining if structured else 1 - remaining, 6),
        "wall_s": round(report.wall_s, 3), "build_s": round(build_s, 3),
        "peak_gpu_gb": round(report.peak_gpu_gb, 3), "peak_host_gb": round(report.peak_host_gb, 3),
        "layers": layers, "params_before": report.params_before, "params_after": report.params_after,
        "shots": 1, "dtype": args.dtype, "batch_size": args.batch_size, "tokens": args.nsamples * args.seqlen,
        "offload_factors": offload, "checkpointing": args.checkpointing,
        **({"correlation": args.correlation} if not structured else {}),
        "phases": phases,
        "estimate": {"peak_gpu_gb": round(est["peak_gpu_gb"], 3), "peak_gpu_phase": est["peak_gpu_phase"],
                     "peak_host_gb": round(est["peak_host_gb"], 3), "peak_host_phase": est["peak_host_phase"],
                     "factor_gb": round(est["factor_gb"], 3), "items": est["items"]},
        "usable_gpu_gb": round(usable / 2**30, 3) if usable else None,
        "device": report.device,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':<13}{'layers':>7}{'phase':>11}{'wall_s':>9}{'gpu GB':>9}{'est.':>8}{'host GB':>9}{'est.':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['structure']:<13}  {r['error']}")
            continue
        for name, p in r["phases"].items():
            lines.append(f"{r['structure']:<13}{r['layers']:>7}{name:>11}{p['wall_s']:>9.2f}{p['peak_gpu_gb']:>9.2f}"
                         f"{p['estimate_gpu_gb']:>8.2f}{p['peak_host_gb']:>9.2f}{p['estimate_host_gb']:>8.2f}")
        e = r["estimate"]
        lines.append(f"{r['structure']:<13}{r['layers']:>7}{'total':>11}{r['wall_s']:>9.2f}{r['peak_gpu_gb']:>9.2f}"
                     f"{e['peak_gpu_gb']:>8.2f}{r['peak_host_gb']:>9.2f}{e['peak_host_gb']:>8.2f}"
                     f"   achieved {r['achieved']:.4f} ({r['target_kind']})")
    return "\n".join(lines)


def _row_args(argv: list[str]) -> list[str]:
    """The command line minus the parent-only options, for a row's own process."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--rows", "--out", "--budget-s"):
            skip = True
            continue
        if a.split("=", 1)[0] in ("--rows", "--out", "--budget-s"):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="structured,unstructured")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, or 2 with --dry-run)")
    p.add_argument("--unstructured-layers", default="auto", help="layers of the unstructured row, or 'auto'")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--step", type=float, default=0.05, help="sparsity removed by the one shot")
    p.add_argument("--correlation", choices=("none", "row", "full"), default="row")
    p.add_argument("--offload", choices=("auto", "on", "off"), default="auto", help="structured row's factors")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of all rows")
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/scale.json; none for --dry-run)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        for k, v in DRY_RUN.items():
            if f"--{k.replace('_', '-')}" not in " ".join(argv):
                setattr(args, k, v)
    args.layers = args.layers or (TINY if args.dry_run else LLAMA2_7B)["num_hidden_layers"]

    if args.row:  # one row, in this process
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        row = run_row(args, args.row)
        Path(args.row_out).write_text(json.dumps(row))
        return

    import torch

    from surgeon.report import versions

    out = args.out or (None if args.dry_run else "benchmarks/results/scale.json")
    deadline = time.monotonic() + args.budget_s
    rows: list[dict[str, Any]] = []
    env = dict(os.environ, SURGEON_MEMORY_CHECK=os.environ.get("SURGEON_MEMORY_CHECK", "error"))
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        left = deadline - time.monotonic()
        if left < 10:
            rows.append({"method": "llm-surgeon", "structure": name, "error": "not run: budget spent"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row_out = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, *_row_args(argv), "--row", name, "--row-out", str(row_out)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, env=env, timeout=left)
                if proc.returncode == 0 and row_out.exists():
                    rows.append(json.loads(row_out.read_text()))
                else:
                    rows.append({"method": "llm-surgeon", "structure": name, "error": f"exit code {proc.returncode}"})
            except subprocess.TimeoutExpired:
                rows.append({"method": "llm-surgeon", "structure": name,
                             "error": f"timed out after {time.monotonic() - t0:.0f} s (budget)"})
        rows[-1]["process_s"] = round(time.monotonic() - t0, 1)
        print(_table(rows[-1:]), flush=True)
        if out:
            _save(args, argv, rows, out, versions, torch)

    print("\n" + _table(rows))
    if out:
        print(f"wrote {out}")
    else:
        brief = [{k: v for k, v in r.items() if k not in ("phases", "estimate")} for r in rows]
        print(json.dumps(brief, indent=1))


def _save(args: argparse.Namespace, argv: list[str], rows: list[dict[str, Any]], out: str, versions: Any, torch: Any) -> None:
    v = versions()
    device = next((r["device"] for r in rows if "device" in r), None) or (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    shape = "tiny Llama (dry run)" if args.dry_run else "Llama-2-7B shape"
    result = {
        "benchmark": "scale",
        "command": " ".join(["python", "benchmarks/bench_scale.py", *argv]),
        "date": dt.date.today().isoformat(),
        "device": device,
        "versions": {"torch": v["torch"], "transformers": v["transformers"], "surgeon_git": v["surgeon_git"],
                     "surgeon_core": v["surgeon_core"], "surgeon_version": v.get("surgeon", ""),
                     "backend": v.get("backend", "")},
        "model": f"{shape}, random weights (seed 0), {args.dtype}, SDPA attention, untied lm_head",
        "protocol": {"calibration": f"random tokens {args.nsamples}x{args.seqlen} seed 0, batch {args.batch_size}",
                     "eval": "none (speed and memory only)",
                     "memory": "peak_gpu_gb: torch.cuda.max_memory_allocated; peak_host_gb: ru_maxrss of the row's "
                               "process; estimate: surgeon.memory.plan"},
        "rows": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
