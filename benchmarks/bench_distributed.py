"""One GPU against two: data-parallel calibration of structured LLM Surgeon on SmolLM2-135M.

    python benchmarks/bench_distributed.py run --tag 1gpu --dir /tmp/dp                        # one process
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py run --tag 2gpu --dir /tmp/dp   # two ranks
    python benchmarks/bench_distributed.py compare --dir /tmp/dp                               # the table

Both runs prune to 80% size in 8 shots of 2.5% (the committed structured protocol of bench_smollm2.py)
on the same seeded calibration windows. With two ranks each rank runs the curvature passes over its
half of the windows and the factors are all-reduced; everything after that is the one-process
computation on every rank. ``compare`` checks that the kept heads and channels are identical, how far
the weights are apart, the perplexities, and the calibration throughput: tokens through the curvature
passes (all ranks) per second of the slowest rank's curvature phase, reduction included, over all
shots and over shots 2.. (the first shot also pays for one-off CUDA/cuBLAS start-up).

The factors are summed in float64 by default (``accumulate="float64"``): fp32 sums of the same batches
split over ranks round differently, and over eight shots such differences can flip a structure at the
threshold. ``--attention math`` also makes the backward pass bit-reproducible (the fused flash
attention backward adds with atomics, so even one process does not repeat itself bit for bit).

``--dry-run`` does the same on a tiny random Llama on the CPU (gloo), to test the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgeon  # noqa: E402
from surgeon import data, distributed, evaluate  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.report import versions  # noqa: E402

#: Weights of the two runs are compared relative to the largest weight of each linear; the curvature
#: sums differ only in the order of additions, which the inverses and OBS updates of 8 shots amplify.
WEIGHT_RTOL = 1e-3


def _setup(args: argparse.Namespace) -> torch.device:
    """This rank's device: under torchrun the process group is joined (NCCL, or gloo for --dry-run)."""
    cpu = args.dry_run or not torch.cuda.is_available()
    return distributed.init_from_env("cpu" if cpu else "cuda") or torch.device("cpu" if cpu else "cuda:0")


@contextlib.contextmanager
def _attention(kind: str) -> Iterator[None]:
    if kind == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


def _model_and_data(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor], str]:
    """(model, calibration windows, {"ppl": WikiText-2 test stream, "ood_ppl": pydoc stream}, model name)."""
    if args.dry_run:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 128, (args.nsamples, args.seqlen), generator=g)
        texts = {k: torch.randint(0, 128, (4 * args.seqlen,), generator=g) for k in ("ppl", "ood_ppl")}
        return model, calib, texts, "tiny random Llama (dry run)"
    from surgeon.models import load_gguf

    model, tok = load_gguf()
    calib = data.calibration_windows(tok, n_samples=args.nsamples, seqlen=args.seqlen, seed=0)
    texts = {"ppl": data.eval_ids(tok, "wikitext2"), "ood_ppl": data.eval_ids(tok, "pydoc")}
    return model, calib, texts, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"


def run(args: argparse.Namespace) -> None:
    device = _setup(args)
    model, calib, texts, model_name = _model_and_data(args)
    cfg = surgeon.SurgeonConfig(sparsity=round(args.steps * args.step, 6), structure="structured", shots=args.steps,
                                seed=0, accumulate=args.accumulate)
    with _attention(args.attention):
        report = surgeon.prune(model, cfg, calib, device=device, batch_size=args.batch_size,
                               progress=distributed.is_main())
    # per shot, the curvature phase of the slowest rank
    curvature_s = torch.tensor([s["phases_s"]["curvature"] for s in report.shots], dtype=torch.float64, device=device)
    weights = adapter_for(model).linears()
    world = distributed.world_size()
    if world > 1:
        dist.all_reduce(curvature_s, op=dist.ReduceOp.MAX)
    try:  # every rank must hold the same pruned model (a no-op in one process)
        distributed.assert_same("pruned weights", [m.weight.detach() for m in weights.values()])
        ranks_agree = True
    except RuntimeError:
        ranks_agree = False
    if distributed.is_main():
        tokens = args.steps * calib.numel()
        steady_s = float(curvature_s[1:].sum()) if args.steps > 1 else float(curvature_s.sum())
        out = Path(args.dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({n: m.weight.detach().float().cpu() for n, m in weights.items()}, out / f"{args.tag}.pt")
        t0 = time.perf_counter()
        ppl = {k: round(evaluate.perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size), 4)
               for k, ids in texts.items()}
        rec = {
            "tag": args.tag, "world_size": world, "backend": distributed.backend() or "none",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": model_name, **ppl, "eval_s": round(time.perf_counter() - t0, 2),
            "achieved": round(report.size, 5), "wall_s": round(report.wall_s, 2),
            "accumulate": args.accumulate, "attention": args.attention,
            "curvature_s": round(float(curvature_s.sum()), 3), "curvature_s_per_shot": [round(float(t), 3) for t in curvature_s],
            "curvature_tokens": tokens, "calibration_tokens_per_s": round(tokens / float(curvature_s.sum())),
            "calibration_tokens_per_s_steady": round(calib.numel() * max(args.steps - 1, 1) / steady_s),
            "phases_s": {k: round(v["wall_s"], 2) for k, v in report.phases.items()},
            "peak_gpu_gb": round(report.peak_gpu_gb, 2), "ranks_agree": ranks_agree,
            "kept_structures": report.extra["kept_structures"],
            "command": " ".join(["torchrun" if world > 1 else Path(sys.executable).name] + sys.argv),
        }
        (out / f"{args.tag}.json").write_text(json.dumps(rec))
        print(json.dumps({k: v for k, v in rec.items() if k != "kept_structures"}), flush=True)
    distributed.finish()


def _pair(d: Path, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How run ``b`` differs from run ``a``: kept structures, weights, perplexity, throughput."""
    ka, kb = a["kept_structures"], b["kept_structures"]
    differ = sum(len(set(ka.get(g, [])) ^ set(kb.get(g, []))) for g in set(ka) | set(kb))
    rel = None
    if differ == 0:
        wa, wb = torch.load(d / f"{a['tag']}.pt"), torch.load(d / f"{b['tag']}.pt")
        rel = max(float((wa[n] - wb[n]).abs().max() / wa[n].abs().max().clamp_min(1e-30)) for n in wa)
    out = {"runs": f"{a['tag']} vs {b['tag']}", "gpus": f"{a['world_size']} vs {b['world_size']}",
           "accumulate": b["accumulate"], "attention": b["attention"], "masks_identical": differ == 0,
           "structures_differing": differ, "max_weight_diff_rel": rel,
           "weights_within_tolerance": rel is not None and rel <= WEIGHT_RTOL,
           "ppl": [a["ppl"], b["ppl"]], "ppl_diff": round(b["ppl"] - a["ppl"], 4)}
    if "ood_ppl" in a and "ood_ppl" in b:
        out["ood_ppl"] = [a["ood_ppl"], b["ood_ppl"]]
    if b["world_size"] > a["world_size"]:
        out["calibration_speedup_2gpu"] = round(b["calibration_tokens_per_s_steady"] / a["calibration_tokens_per_s_steady"], 3)
        out["calibration_speedup_2gpu_all_shots"] = round(b["calibration_tokens_per_s"] / a["calibration_tokens_per_s"], 3)
    return out


def compare(args: argparse.Namespace) -> dict[str, Any]:
    d = Path(args.dir)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    tags = list(dict.fromkeys(t for p in pairs for t in p))
    runs = {t: json.loads((d / f"{t}.json").read_text()) for t in tags}
    rows = []
    for t in tags:
        r = runs[t]
        rows.append({
            "method": "llm-surgeon", "structure": "structured", "target": round(1 - args.steps * args.step, 4),
            "target_kind": "size", "achieved": r["achieved"], "ppl": r["ppl"], "ood_ppl": r.get("ood_ppl"),
            "wall_s": r["wall_s"],
            "peak_gpu_gb": r["peak_gpu_gb"], "run": t, "gpus": r["world_size"], "accumulate": r["accumulate"],
            "attention": r["attention"], "curvature_s": r["curvature_s"], "curvature_s_per_shot": r["curvature_s_per_shot"],
            "calibration_tokens_per_s": r["calibration_tokens_per_s"],
            "calibration_tokens_per_s_steady": r["calibration_tokens_per_s_steady"], "phases_s": r["phases_s"],
            "ranks_agree": r["ranks_agree"], "command": r["command"],
        })
    comparisons = [_pair(d, runs[a], runs[b]) for a, b in pairs]
    for c in comparisons:  # the two-GPU row carries the headline figures
        if "calibration_speedup_2gpu" in c:
            row = next(r for r in rows if r["run"] == c["runs"].split(" vs ")[1])
            row.update({k: c[k] for k in ("calibration_speedup_2gpu", "calibration_speedup_2gpu_all_shots",
                                          "masks_identical", "structures_differing", "max_weight_diff_rel")})
    last = runs[tags[-1]]
    result = {
        "benchmark": "distributed", "command": "; ".join(runs[t]["command"] for t in tags) + "; "
                   + " ".join(["python"] + sys.argv),
        "date": dt.date.today().isoformat(), "device": f"{max(r['world_size'] for r in runs.values())} x {last['device']}",
        "versions": versions(), "model": last["model"],
        "protocol": {"calibration": f"wikitext2-valid (tokenised) {args.nsamples}x{args.seqlen} seed 0, "
                                    f"batch {args.batch_size} per rank",
                     "eval": f"wikitext2-test raw, seqlen {args.seqlen}",
                     "ood_eval": f"pydoc (Python 3.11.7 reference documentation, shipped), seqlen {args.seqlen}",
                     "schedule": f"{args.steps} shots of {args.step} size, fp32 weights, bf16-autocast calibration",
                     "tolerance": f"max |W_2gpu - W_1gpu| / max |W_1gpu| per linear <= {WEIGHT_RTOL}"},
        "rows": rows, "comparisons": comparisons,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(comparisons, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("run", "compare"))
    p.add_argument("--dir", required=True, help="where runs leave their weights and records")
    p.add_argument("--tag", default="run", help="name of this run's files (run)")
    p.add_argument("--pairs", default="1gpu:2gpu", help="compare: comma-separated TAG_A:TAG_B runs to compare "
                   "(the first of a one/two-GPU pair is the baseline)")
    p.add_argument("--accumulate", choices=("float32", "float64"), default="float64", help="dtype of the K-FAC sums")
    p.add_argument("--attention", choices=("sdpa", "math"), default="sdpa",
                   help="'math' forces the deterministic SDPA backend during pruning")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="shots")
    p.add_argument("--step", type=float, default=0.025, help="size removed per shot")
    p.add_argument("--dry-run", action="store_true", help="tiny random model on the CPU")
    p.add_argument("--out", default=None, help="compare: results JSON (default benchmarks/results/distributed.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.nsamples, args.seqlen, args.batch_size, args.steps, args.step = 8, 32, 2, 2, 0.1
    if args.mode == "run":
        run(args)
    else:
        if args.out is None and not args.dry_run:
            args.out = "benchmarks/results/distributed.json"
        compare(args)


if __name__ == "__main__":
    main()
