"""Every method and variant on SmolLM2-135M-Instruct: one row per run, both evaluation texts.

    python benchmarks/bench_smollm2.py --set main --jobs 4                        # the README's table (GPU)
    python benchmarks/bench_smollm2.py --set structured,unstructured --jobs 4 --deterministic  # ablations
    python benchmarks/bench_smollm2.py --set main --quick                         # CPU smoke run

Variants are declared in ``benchmarks/suites/<set>.py`` (the results tables) and
``benchmarks/ablations/<set>.py`` (the ablations): a list ``VARIANTS`` of dicts with label, method,
structure, sparsity, config (fields of the method's config dataclass), and optional checkpoints
{shot: size remaining} (one structured schedule read at several sizes). Every row reports perplexity on
the WikiText-2 test split (``ppl``), on the shipped out-of-domain text (``ood_ppl``) and on the first
calibration windows (``calib_ppl``) and on windows of the calibration text that no calibration window
touches (``held_ppl``, :func:`surgeon.data.held_out_windows`). Settings are chosen on ``calib_ppl`` (the
data the method was given) or, for those that regularise a fit (dampings), on ``held_ppl``: the windows a
fit saw always prefer less regularisation. The two test texts only report.

Several variants run at once on one GPU (``--jobs``): a 135M-parameter model leaves most of an H200
idle, so concurrent processes finish the table several times sooner. Their wall times are measured under
that sharing and say so (``concurrent_jobs``); the main results table times runs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def load_variants(names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        found = [HERE / d / f"{name}.py" for d in ("suites", "ablations") if (HERE / d / f"{name}.py").is_file()]
        if not found:
            raise SystemExit(f"no variant set {name!r} in benchmarks/suites or benchmarks/ablations")
        path = found[0]
        spec = importlib.util.spec_from_file_location(f"ablation_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        for v in mod.VARIANTS:
            out.append({**v, "set": name})
    return out


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Bit-reproducible runs: the library's deterministic mode."""
    from surgeon.determinism import deterministic

    with deterministic(on):
        yield


def command_line() -> str:
    """How this run was started, as its results record it."""
    return " ".join([Path(sys.executable).name] + sys.argv)


def evaluate_all(model: Any, texts: dict[str, Any], seqlen: int, batch: int) -> dict[str, float]:
    from surgeon import evaluate

    # a 2-D text is a stack of windows of its own length (the held-out windows), a 1-D one a stream
    return {key: round(evaluate.perplexity(model, ids, seqlen=ids.shape[1] if ids.dim() == 2 else seqlen,
                                           batch_size=batch), 3) for key, ids in texts.items()}


def tokens_per_s(model: Any, device: Any, seqlen: int, batch: int = 8, reps: int = 5) -> float:
    """Forward throughput in bf16 autocast on a fixed batch (inference speed of the model as pruned)."""
    import torch

    x = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
    cuda = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        model(input_ids=x, use_cache=False)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x, use_cache=False)
        if cuda:
            torch.cuda.synchronize()
    return batch * seqlen * reps / (time.perf_counter() - t0)


def save_allocation(model: Any, data: dict[str, Any], v: dict[str, Any], target: float, folder: str) -> str:
    """Write the pruned model's per-linear shapes as a report (``bench_serving.py --report`` reads it)."""
    from surgeon.adapters import adapter_for

    modules = data["modules"]
    recs = {n: {**modules[n], "shape": list(lin.weight.shape), "params_after": lin.weight.numel()}
            for n, lin in adapter_for(model).linears().items()}
    slug = "".join(c if c.isalnum() else "-" for c in v["label"].split(" ")[0].lower())
    path = Path(folder) / f"allocation-{slug}-{round(target * 100)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": v["method"], "config": v.get("config", {}), "model": "SmolLM2-135M-Instruct",
                                "versions": data["versions"], "extra": {"command": data["command"]},
                                "params_before": sum(r["params_before"] for r in recs.values()),
                                "params_after": sum(r["params_after"] for r in recs.values()),
                                "modules": recs}, indent=1))
    return path.name


def run_variant(v: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    """Prune a fresh copy of the dense model as ``v`` says; one row per checkpoint (or one at the end)."""
    import torch

    import surgeon
    from surgeon.adapters import adapter_for
    from surgeon.io import load_pruned
    from surgeon.methods import METHODS

    structure = v["structure"]
    model = load_pruned(data["model_dir"], dtype=torch.float32).to(device)
    params0 = adapter_for(model).prunable_params()
    structured = structure == "structured"
    rows: list[dict[str, Any]] = []
    checkpoints = {int(k): float(s) for k, s in (v.get("checkpoints") or {}).items()}
    eval_s = [0.0]
    t_start = time.perf_counter()

    def row(target: float, shot: int | None) -> None:
        t0 = time.perf_counter()
        adapter = adapter_for(model)
        if structured:
            left = adapter.prunable_params()
        else:
            left = sum(int(torch.count_nonzero(m.weight)) for m in adapter.linears().values())
        r: dict[str, Any] = {
            "label": v["label"], "set": v["set"], "method": v["method"], "structure": structure,
            "target": target, "target_kind": "size" if structured else "sparsity",
            "achieved": round(left / params0 if structured else 1 - left / params0, 5),
            "wall_s": round(t0 - t_start - eval_s[0], 2), "config": v.get("config", {}),
        }
        if v.get("repeat"):
            r["repeat"] = v["repeat"]
        if shot is not None:
            r["shot"] = shot
        if structured and args.allocations:
            r["allocation_file"] = save_allocation(model, data, v, target, args.allocations)
        r.update(evaluate_all(model, data["texts"], args.eval_seqlen, args.eval_batch))
        if structured or v["method"] == "dense":
            r["tokens_per_s_after"] = round(tokens_per_s(model, device, args.eval_seqlen))
        rows.append(r)
        print(json.dumps(r), flush=True)
        eval_s[0] += time.perf_counter() - t0

    def on_shot(rec: dict[str, Any]) -> None:
        if rec["shot"] in checkpoints:
            row(checkpoints[rec["shot"]], rec["shot"])

    if v["method"] == "dense":
        row(1.0, None)
        return rows
    cfg_cls, _ = METHODS[v["method"]]
    cfg = cfg_cls(sparsity=v["sparsity"] if ":" not in structure else 0.0, structure=structure, **v.get("config", {}))
    report = surgeon.prune(model, cfg, data["calibration"], device=device, batch_size=args.batch_size,
                           progress=False, on_shot=on_shot if checkpoints else None)
    if not checkpoints:
        row(round(1 - v["sparsity"], 4) if structured else (v["sparsity"] if ":" not in structure else 0.5), None)
    for r in rows:
        r["peak_gpu_gb"] = round(report.peak_gpu_gb, 2)
        r["phases_s"] = {k: round(p["wall_s"], 2) for k, p in report.phases.items()}
    return rows


def worker(rank: int, jobs: list[dict[str, Any]], data_path: str, args: argparse.Namespace, out_dir: str) -> None:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = torch.load(data_path, weights_only=False)
    for i, v in jobs:
        t0 = time.perf_counter()
        try:
            with deterministic_mode(args.deterministic):
                rows = run_variant(v, data, args, device)
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the table
            traceback.print_exc()
            rows = [{"label": v["label"], "set": v["set"], "method": v["method"], "structure": v["structure"],
                     "config": v.get("config", {}), "error": f"{type(e).__name__}: {e}"}]
        for r in rows:
            r["job_s"] = round(time.perf_counter() - t0, 1)
        Path(out_dir, f"{i:03d}.json").write_text(json.dumps(rows))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def prepare(args: argparse.Namespace, tmp: Path) -> str:
    """Load the dense model once, store it and every token stream where the workers read them."""
    import torch

    from surgeon import data
    from surgeon.io import save_pruned
    from surgeon.models import load_gguf

    model, tok = load_gguf()
    model_dir = tmp / "dense"
    save_pruned(model, model_dir, tokenizer=tok)
    stream = data.tokenize_text(tok, data.calibration_text("wikitext2"))
    calib = data.random_windows(stream, args.nsamples, args.seqlen, seed=0)  # = data.calibration_windows(tok, ...)
    held = data.held_out_windows(stream, args.nsamples, args.seqlen, seed=0, length=args.held_seqlen)
    held = held[: args.held_windows or len(held)]
    texts = {name: data.eval_ids(tok, name) for name in ("wikitext2", "pydoc")}
    if args.eval_windows:
        texts = {k: t[: args.eval_windows * args.eval_seqlen] for k, t in texts.items()}
    texts = {"ppl": texts["wikitext2"], "ood_ppl": texts["pydoc"],
             "calib_ppl": calib[: args.calib_eval_windows].reshape(-1), "held_ppl": held}
    from surgeon.adapters import adapter_for

    adapter = adapter_for(model)
    modules = {n: {"layer": i, "type": n.split(f".{i}.", 1)[1], "params_before": lin.weight.numel()}
               for i in range(len(adapter.layers)) for n, lin in adapter.layer_linears(i).items()}
    path = tmp / "data.pt"
    from surgeon.report import versions

    torch.save({"model_dir": str(model_dir), "calibration": calib, "texts": texts, "modules": modules,
                "versions": versions(), "command": command_line()}, path)
    return str(path)


def markdown(out: dict[str, Any]) -> str:
    lines = [f"# {out['benchmark']}", ""]
    lines += [f"**{title}:** {out[key]}\n" for key, title in (("historical_reason", "Historical"), ("note", "Note"))
              if out.get(key)]
    lines += [f"`{out['command']}`", "",
             f"{out['device']}, torch {out['versions']['torch']}, transformers {out['versions']['transformers']}, "
             f"surgeon {out['versions']['surgeon_git']}; {out['protocol']['calibration']}; eval {out['protocol']['eval']}; "
             f"deterministic: {out['deterministic']}; " + ("one run at a time (wall times its own)." if out["concurrent_jobs"] == 1
                                                        else f"{out['concurrent_jobs']} variants at a time (wall times shared)."),
             "", "| set | variant | structure | target | achieved | calib ppl | held-out ppl | WikiText-2 ppl | "
                 "out-of-domain ppl | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['label']} | {r['structure']} | | | error: {r['error'][:80]} | | | | |")
            continue
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "") + (f" [run {r['repeat']}]" if r.get("repeat") else "")
        lines.append(f"| {r['set']} | {label} | {r['structure']} | {r['target']} | {r['achieved']} | "
                     f"{r['calib_ppl']:.3f} | {_num(r, 'held_ppl')} | {r['ppl']:.3f} | {r['ood_ppl']:.3f} | {r['wall_s']:.1f} |")
    lines += repeat_summary(out["rows"], out["deterministic"])
    return "\n".join(lines) + "\n"


def _num(r: dict[str, Any], key: str) -> str:
    """A perplexity cell; blank where the row predates the measure."""
    return f"{r[key]:.3f}" if r.get(key) is not None else ""


def configuration(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two rows runs of one configuration (``merge_results.py`` adds the repeat number)."""
    return r.get("label"), r.get("structure"), r.get("target")


def repeat_summary(rows: list[dict[str, Any]], deterministic: bool) -> list[str]:
    """Mean and range of each repeated configuration: what one run of it can be expected to give."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("repeat") and "error" not in r:
            groups.setdefault(configuration(r), []).append(r)
    groups = {k: g for k, g in groups.items() if len(g) > 1}
    if not groups:
        return []
    how = "deterministic" if deterministic else "not deterministic"
    lines = ["", f"Repeats (the same configuration run again; {how}): mean, and min–max in brackets.", "",
             "| variant | structure | target | runs | calib ppl | held-out ppl | WikiText-2 ppl | out-of-domain ppl | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def stat(g: list[dict[str, Any]], key: str, digits: int = 3) -> str:
        if any(r.get(key) is None for r in g):
            return ""
        xs = [float(r[key]) for r in g]
        return f"{sum(xs) / len(xs):.{digits}f} [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"

    for (label, structure, target), g in groups.items():
        lines.append(f"| {label} | {structure} | {target} | {len(g)} | {stat(g, 'calib_ppl')} | {stat(g, 'held_ppl')} | "
                     f"{stat(g, 'ppl')} | {stat(g, 'ood_ppl')} | {stat(g, 'wall_s', 1)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", default="main", help="comma-separated variant sets (benchmarks/suites, benchmarks/ablations)")
    p.add_argument("--only", default="", help="comma-separated substrings: run variants whose label contains one")
    p.add_argument("--exclude", default="", help="comma-separated substrings: skip variants whose label contains one")
    p.add_argument("--structures", default="", help="comma-separated structures (structured, unstructured, 2:4, none): "
                                                   "run only variants of these")
    p.add_argument("--allocations", default="", metavar="DIR",
                   help="write each structured row's per-linear shapes here (inputs of bench_serving.py --report)")
    p.add_argument("--jobs", type=int, default=1, help="variants run at once (processes sharing the device)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every selected variant this many times (rounds of all variants, so a run cut short "
                        "still has each); the table adds each one's mean and range")
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible runs (math attention, fixed reductions)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=0, help="evaluate on the first N windows of each text (0 = all)")
    p.add_argument("--calib-eval-windows", type=int, default=16, help="calibration windows whose perplexity is reported")
    p.add_argument("--held-seqlen", type=int, default=512,
                   help="length of the held-out windows (the calibration text outside every calibration window)")
    p.add_argument("--held-windows", type=int, default=0, help="evaluate on the first N held-out windows (0 = all)")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny calibration and evaluation (CPU smoke run)")
    p.add_argument("--out", default=None, help="output JSON (default: benchmarks/results/ablation-<sets>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.nsamples, args.seqlen, args.batch_size = 4, 128, 2
        args.eval_seqlen, args.eval_windows, args.calib_eval_windows = 128, 2, 2
        args.held_seqlen, args.held_windows = 128, 2
    sets = [s for s in args.set.split(",") if s]
    variants = load_variants(sets)
    if args.only:
        keys = args.only.split(",")
        variants = [v for v in variants if any(k in v["label"] for k in keys)]
    if args.exclude:
        keys = args.exclude.split(",")
        variants = [v for v in variants if not any(k in v["label"] for k in keys)]
    if args.structures:
        keep = set(args.structures.split(","))
        variants = [v for v in variants if v["structure"] in keep]
    if args.quick:  # a smoke run: every variant, two shots
        for v in variants:
            cfg = dict(v.get("config", {}))
            if "shots" in cfg:
                cfg["shots"] = min(cfg["shots"], 2)
            v["config"] = cfg
            v["checkpoints"] = {2: 1 - v["sparsity"]} if v.get("checkpoints") else None
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {args.repeat}")
    if args.repeat > 1:
        variants = [{**v, "repeat": k} for k in range(1, args.repeat + 1) for v in variants]
    default = "smollm2" if sets == ["main"] else "ablation-" + "-".join(sets)
    out_path = Path(args.out or HERE / "results" / f"{default}{'-quick' if args.quick else ''}.json")

    import torch
    import torch.multiprocessing as mp

    from surgeon.report import versions

    with tempfile.TemporaryDirectory(prefix="surgeon-ablation-") as tmp:
        t0 = time.perf_counter()
        data_path = prepare(args, Path(tmp))
        print(f"prepared model and data in {time.perf_counter() - t0:.1f}s; {len(variants)} variants, "
              f"{args.jobs} at a time", flush=True)
        rows_dir = Path(tmp) / "rows"
        rows_dir.mkdir()
        jobs = list(enumerate(variants))
        shares = [jobs[r :: args.jobs] for r in range(args.jobs)]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, shares[r], data_path, args, str(rows_dir))) for r in range(args.jobs)
                 if shares[r]]
        for pr in procs:
            pr.start()
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        head = {
            "benchmark": out_path.stem, "command": command_line(),
            "date": dt.date.today().isoformat(),
            "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu", "versions": versions(),
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
            "protocol": {"calibration": f"wikitext2-valid (tokenised) {args.nsamples}x{args.seqlen} seed 0",
                         "eval": f"wikitext2-test raw (ppl) and pydoc out-of-domain text (ood_ppl), seqlen "
                                 f"{args.eval_seqlen}" + (f", first {args.eval_windows} windows" if args.eval_windows else "")
                                 + f"; calib_ppl: first {args.calib_eval_windows} calibration windows"
                                 + f"; held_ppl: {'the first ' + str(args.held_windows) if args.held_windows else 'all'} "
                                   f"windows of {args.held_seqlen} tokens of wikitext2-valid outside the calibration windows",
                         "selection": "settings are chosen on calib_ppl, dampings on held_ppl; ppl and ood_ppl only report"},
            "deterministic": args.deterministic, "concurrent_jobs": args.jobs, "repeat": args.repeat,
        }

        def collect() -> None:
            rows = []
            for f in sorted(rows_dir.glob("*.json")):
                rows += json.loads(f.read_text())
            out = {**head, "rows": rows}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=2))
            out_path.with_suffix(".md").write_text(markdown(out))

        while any(pr.is_alive() for pr in procs):
            time.sleep(5)
            collect()
        for pr in procs:
            pr.join()
        collect()
    print(f"wrote {out_path} in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
