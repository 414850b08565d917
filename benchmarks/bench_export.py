"""Pruned SmolLM2 exported to GGUF and run in llama.cpp: logits and perplexity against transformers (CPU).

    python benchmarks/bench_export.py                 # prune (structured LLM Surgeon, 80% size), export, compare
    python benchmarks/bench_export.py --run DIR       # an already pruned run folder (surgeon prune --output DIR)
    python benchmarks/bench_export.py --set align=8   # LLM Surgeon options for the pruning run

Rows: the dense model (llama.cpp's ``llama`` architecture) and the pruned one (``deci`` for per-layer shapes,
``llama`` when every layer has one shape), each exported with f32 and with f16 weights. Both runtimes get
the same token ids: the first ``--windows`` non-overlapping windows of ``--seqlen`` tokens of each
evaluation text, one fresh context per window; perplexity is exp(mean NLL of the ``seqlen - 1``
next-token predictions per window), as in ``surgeon.evaluate.perplexity``, and the logit differences are
taken over every position of those windows. llama.cpp runs with an f32 KV cache and no flash attention,
so the f32 rows compare the computation alone and the f16 rows add only the rounding of the weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgeon  # noqa: E402
from surgeon import data  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.export import gguf_layout, to_gguf  # noqa: E402
from surgeon.io import load_pruned  # noqa: E402
from surgeon.methods import METHODS  # noqa: E402
from surgeon.models import find_smollm2_gguf, load_gguf  # noqa: E402
from surgeon.report import versions  # noqa: E402


def eval_streams(tok: Any) -> dict[str, torch.Tensor]:
    """Token streams of the evaluation texts: ``ppl`` (WikiText-2 test) and, where this version of the
    library ships it, ``ood_ppl`` (the out-of-domain text)."""
    if hasattr(data, "eval_ids"):
        return {"ppl": data.eval_ids(tok, "wikitext2"), "ood_ppl": data.eval_ids(tok, "pydoc")}
    return {"ppl": data.wikitext2_test_ids(tok)}


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of one window (float64 log-softmax)."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


class Compare:
    """Both runtimes over the same windows: NLL sums, logit differences, top-1 agreement, times."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows
        self.nll = {"transformers": 0.0, "llama_cpp": 0.0}
        self.max_diff, self.sum_diff, self.agree, self.count = 0.0, 0.0, 0, 0
        self.time = {"transformers": 0.0, "llama_cpp": 0.0}

    def run(self, model: torch.nn.Module, llm: Any) -> None:
        for w in self.windows:
            ids = w.numpy()
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = model(input_ids=w[None], use_cache=False).logits[0].float().numpy()
            t1 = time.perf_counter()
            llm.reset()
            llm.eval(ids.tolist())
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            t2 = time.perf_counter()
            self.time["transformers"] += t1 - t0
            self.time["llama_cpp"] += t2 - t1
            diff = np.abs(got.astype(np.float64) - ref)
            self.max_diff = max(self.max_diff, float(diff.max()))
            self.sum_diff += float(diff.sum())
            self.count += diff.size
            self.agree += int((got.argmax(1) == ref.argmax(1)).sum())
            self.nll["transformers"] += _nll(ref, ids)
            self.nll["llama_cpp"] += _nll(got, ids)

    def ppl(self, runtime: str) -> float:
        return float(np.exp(self.nll[runtime] / (self.windows.shape[0] * (self.windows.shape[1] - 1))))


def linear_size(model: torch.nn.Module, dense_params: int) -> float:
    return adapter_for(model).prunable_params() / dense_params


def prune(dense: torch.nn.Module, tok: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    import copy

    cfg_cls = METHODS["llm-surgeon"][0]
    options = {"shots": args.shots}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            options[key] = value
    cfg = cfg_cls(sparsity=round(1 - args.size, 4), structure="structured", **options)
    calib = data.calibration_windows(tok, n_samples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    surgeon.prune(model, cfg, calib, device="cpu", progress=False)
    info = {"config": cfg.to_dict(), "prune_s": round(time.perf_counter() - t0, 1),
            "calibration": f"wikitext2-valid {args.nsamples}x{args.calib_seqlen} seed 0"}
    return model.eval(), info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, metavar="DIR", help="a pruned run folder to export (default: prune here)")
    p.add_argument("--size", type=float, default=0.8, help="fraction of the prunable linear weights kept (default 0.8)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an LLM Surgeon option")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows per text (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--dtypes", default="f32,f16")
    p.add_argument("--out", default="benchmarks/results/export.json")
    args = p.parse_args(argv)
    import llama_cpp

    torch.set_num_threads(args.threads)
    source = find_smollm2_gguf()
    dense, tok = load_gguf(source)
    dense_params = adapter_for(dense).prunable_params()
    streams = {k: ids[: args.windows * args.seqlen].view(-1, args.seqlen) for k, ids in eval_streams(tok).items()}
    if args.run:
        pruned, info = load_pruned(args.run), {"run": str(Path(args.run).resolve())}
    else:
        pruned, info = prune(dense, tok, args)
    models = {"dense": dense, "llm-surgeon": pruned}
    rows: list[dict[str, Any]] = []
    out = Path(args.out)

    def save() -> None:
        result = {
            "benchmark": "export", "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": dt.date.today().isoformat(), "device": f"cpu ({args.threads} threads, shared machine)",
            "versions": {**versions(), "llama_cpp_python": llama_cpp.__version__, "gguf": metadata.version("gguf")},
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
            "protocol": {"pruning": info, "eval": {k: f"first {v.shape[0]} windows of {v.shape[1]} tokens"
                                                   for k, v in streams.items()},
                         "llama_cpp": "llama-cpp-python, f32 KV cache, no flash attention, one context per window",
                         "target": "fraction of prunable linear weights remaining (embeddings and lm_head excluded)"},
            "rows": rows,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from table import render

        out.with_suffix(".md").write_text(render(result))

    with tempfile.TemporaryDirectory() as tmp:
        for method, model in models.items():
            layout = gguf_layout(model)
            size = linear_size(model, dense_params)
            for dtype in args.dtypes.split(","):
                path = Path(tmp) / f"{method}-{dtype}.gguf"
                t0 = time.perf_counter()
                to_gguf(model, tok, path, dtype=dtype, source_gguf=source)
                export_s = time.perf_counter() - t0
                llm = llama_cpp.Llama(str(path), n_ctx=args.seqlen, n_batch=args.seqlen, n_ubatch=args.seqlen,
                                      logits_all=True, verbose=False, n_threads=args.threads, flash_attn=False,
                                      type_k=0, type_v=0)  # ggml type 0 = f32
                row: dict[str, Any] = {
                    "method": method, "structure": "structured" if method != "dense" else "none",
                    "target": 1.0 if method == "dense" else args.size, "target_kind": "size", "achieved": round(size, 4),
                    "arch": layout.arch, "gguf_dtype": dtype, "gguf_mb": round(path.stat().st_size / 2**20, 1),
                    "export_s": round(export_s, 1), "params_after": adapter_for(model).prunable_params(),
                }
                for text, windows in streams.items():
                    c = Compare(windows)
                    c.run(model, llm)
                    suffix = "" if text == "ppl" else "_ood"
                    row[text] = round(c.ppl("transformers"), 4)
                    row[f"{text}_llama_cpp"] = round(c.ppl("llama_cpp"), 4)
                    row[f"{text}_rel_diff"] = float(f"{c.ppl('llama_cpp') / c.ppl('transformers') - 1:.2e}")
                    row[f"max_abs_logit_diff{suffix}"] = float(f"{c.max_diff:.3g}")
                    row[f"mean_abs_logit_diff{suffix}"] = float(f"{c.sum_diff / c.count:.3g}")
                    row[f"top1_agreement{suffix}"] = round(c.agree / (windows.numel()), 5)
                    row[f"eval_s_transformers{suffix}"] = round(c.time["transformers"], 1)
                    row[f"eval_s_llama_cpp{suffix}"] = round(c.time["llama_cpp"], 1)
                del llm
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
