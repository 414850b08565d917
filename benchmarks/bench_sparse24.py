"""2:4 semi-structured sparsity on an NVIDIA GPU: dense vs converted products and SmolLM2-135M forward speed.

    python benchmarks/bench_sparse24.py              # GPU with compute capability >= 8.0; about 1 minute
    python benchmarks/bench_sparse24.py --dry-run    # any machine: every code path at toy sizes, nothing written

Two parts, each in float16 and bfloat16, with torch's two semi-structured backends (cuSPARSELt, the
default, and CUTLASS, ``SparseSemiStructuredTensor._FORCE_CUTLASS``):

- ``matmul``: ``F.linear(x, W)`` with a dense W that has 2:4 zeros (magnitude-pruned random weights)
  against the same W in semi-structured form, for the linear shapes of SmolLM2-135M and Llama-2-7B
  at 1 .. 8192 tokens. Median of CUDA-event timings per call after a warm-up; eager mode, so Python
  dispatch of the tensor subclass is part of the cost, as it is for a user.
- ``model``: SmolLM2-135M-Instruct, 2:4 magnitude-pruned (quality is irrelevant here), forward
  tokens/s of the dense model with zeros against the converted one (all 210 prunable linears), at
  8 x 2048 (prefill-like) and 1 x 1 (one token, no KV cache: decode-like), once for the whole model and
  once for the decoder stack without ``lm_head`` (unpruned, 49152 x 576: a large share of the compute).

``--dry-run`` replaces the semi-structured compression by a dense copy and times on whatever device is
there at toy sizes, so the script's own logic is exercised without a GPU; its numbers mean nothing and
no file is written. Writes ``benchmarks/results/sparse24.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgeon  # noqa: E402
from surgeon import sparse24  # noqa: E402
from surgeon.masks import nm_mask  # noqa: E402
from surgeon.methods.magnitude import MagnitudeConfig  # noqa: E402
from surgeon.report import versions  # noqa: E402

# (label, out_features, in_features) of the prunable linears benchmarked one by one.
SHAPES = (
    ("SmolLM2-135M mlp.gate/up", 1536, 576),
    ("SmolLM2-135M mlp.down", 576, 1536),
    ("SmolLM2-135M attn.q/o", 576, 576),
    ("Llama-2-7B attn.q/k/v/o", 4096, 4096),
    ("Llama-2-7B mlp.gate/up", 11008, 4096),
    ("Llama-2-7B mlp.down", 4096, 11008),
)
TOKENS = (1, 16, 128, 2048, 8192)
MODEL_SHAPES = ((8, 2048), (1, 1))
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("cusparselt", "cutlass")


# -- timing ------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], Any], *, warmup: int, reps: int, device: torch.device) -> float:
    """Median wall time of one call of ``fn`` in ms: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Select torch's semi-structured backend for the conversions made inside."""
    cls = torch.sparse.SparseSemiStructuredTensor
    old = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = name == "cutlass"
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = old


@contextlib.contextmanager
def dense_stand_in(active: bool) -> Iterator[None]:
    """In a dry run: no GPU check, and a dense copy in place of the semi-structured compression."""
    if not active:
        yield
        return
    saved = sparse24._require_gpu, sparse24.to_sparse_semi_structured
    sparse24._require_gpu = lambda devices: None
    sparse24.to_sparse_semi_structured = lambda w: w.clone()
    try:
        yield
    finally:
        sparse24._require_gpu, sparse24.to_sparse_semi_structured = saved


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the error as a string: one refused configuration should not lose the others' numbers."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return f"{type(e).__name__}: {e}"[:400]


def compress(w: torch.Tensor, dry_run: bool) -> torch.Tensor:
    return w.clone() if dry_run else torch.sparse.to_sparse_semi_structured(w)


# -- the two parts -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.model_name = ""

    def add(self, row: dict[str, Any]) -> None:
        """Record a row and rewrite the results file, so a run cut short still leaves what it measured."""
        self.rows.append(row)
        keys = ("part", "variant", "dtype", "backend", "tokens", "batch", "seqlen", "dense_ms", "sparse_ms", "speedup",
                "error")
        print(" | ".join(f"{k}={row[k]}" for k in keys if k in row), flush=True)
        if not self.args.dry_run:
            self.save()

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.result(), indent=2) + "\n")

    def matmul(self) -> None:
        a, dev = self.args, self.device
        g = torch.Generator(dev).manual_seed(0)
        for label, out_f, in_f in [s for s in SHAPES if s[0] in a.shape_labels]:
            w32 = torch.randn(out_f, in_f, device=dev, generator=g)
            w32 *= nm_mask(w32.abs(), 2, 4)
            for dname in a.dtypes:
                dtype = DTYPES[dname]
                w = w32.to(dtype)
                assert sparse24.check_2to4(w)
                sparse: dict[str, torch.Tensor | str] = {}
                for b in a.backends:
                    with backend(b):
                        sparse[b] = attempt(lambda: compress(w, a.dry_run))
                for n in a.tokens:
                    x = torch.randn(n, in_f, device=dev, dtype=dtype, generator=g)
                    ref = F.linear(x, w)
                    dense_ms = median_ms(lambda: F.linear(x, w), warmup=a.warmup, reps=a.reps, device=dev)
                    for b, ws in sparse.items():
                        row = {"part": "matmul", "method": "magnitude", "structure": "2:4", "variant": label,
                               "out_features": out_f, "in_features": in_f, "tokens": n, "dtype": dname, "backend": b,
                               "dense_ms": round(dense_ms, 5)}

                        def measure() -> dict[str, Any]:
                            out = F.linear(x, ws)
                            err = (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)
                            ms = median_ms(lambda: F.linear(x, ws), warmup=a.warmup, reps=a.reps, device=dev)
                            return {"sparse_ms": round(ms, 5), "speedup": round(dense_ms / ms, 3),
                                    "max_rel_err": float(f"{float(err):.3g}")}

                        got = ws if isinstance(ws, str) else attempt(measure)
                        self.add({**row, **({"error": got} if isinstance(got, str) else got)})
                    del x, ref
                del sparse, w
            del w32
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def load_model(self) -> tuple[torch.nn.Module, str]:
        """SmolLM2-135M 2:4 magnitude-pruned in fp32 on the device (a tiny random Llama in a dry run without it)."""
        from surgeon.models import load_gguf

        try:
            model, _ = load_gguf()
            name = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 2:4 magnitude"
        except (FileNotFoundError, ImportError):
            if not self.args.dry_run:
                raise
            import transformers

            cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
            model, name = transformers.AutoModelForCausalLM.from_config(cfg).eval(), "tiny random Llama (dry run)"
        calib = torch.randint(0, model.config.vocab_size, (1, 8))  # magnitude ignores calibration data
        surgeon.prune(model, MagnitudeConfig(structure="2:4"), calib, device=self.device, progress=False)
        return model.to(self.device), name

    def model(self) -> None:
        a, dev = self.args, self.device
        pruned, self.model_name = self.load_model()
        for dname in a.dtypes:
            dense = copy.deepcopy(pruned).to(DTYPES[dname])
            for b in a.backends:
                sparse = copy.deepcopy(dense)
                t0 = time.perf_counter()
                with backend(b), dense_stand_in(a.dry_run):
                    names = attempt(lambda: sparse24.to_semi_structured(sparse))
                convert_s = time.perf_counter() - t0
                for batch, seqlen in a.model_shapes:
                    ids = torch.randint(0, pruned.config.vocab_size, (batch, seqlen), device=dev,
                                        generator=torch.Generator(dev).manual_seed(0))
                    for scope in ("model", "decoder"):
                        row = {"part": "model", "method": "magnitude", "structure": "2:4",
                               "variant": "whole model" if scope == "model" else "decoder only (no lm_head)",
                               "batch": batch, "seqlen": seqlen, "dtype": dname, "backend": b}

                        def fwd(m: torch.nn.Module) -> torch.Tensor:
                            m = m if scope == "model" else m.model
                            out = m(input_ids=ids, use_cache=False)
                            return out.logits if scope == "model" else out.last_hidden_state

                        def measure() -> dict[str, Any]:
                            with torch.no_grad():
                                ref, out = fwd(dense).float(), fwd(sparse).float()
                                diff = float((out - ref).abs().max())
                                del ref, out
                                dense_ms = median_ms(lambda: fwd(dense), warmup=a.warmup, reps=a.model_reps, device=dev)
                                sparse_ms = median_ms(lambda: fwd(sparse), warmup=a.warmup, reps=a.model_reps,
                                                      device=dev)
                            tokens = batch * seqlen
                            return {"converted_linears": len(names), "convert_s": round(convert_s, 3),
                                    "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
                                    "tokens_per_s_dense": round(tokens / dense_ms * 1e3),
                                    "tokens_per_s_after": round(tokens / sparse_ms * 1e3),
                                    "speedup": round(dense_ms / sparse_ms, 3), "max_abs_diff": float(f"{diff:.3g}")}

                        got = names if isinstance(names, str) else attempt(measure)
                        self.add({**row, **({"error": got} if isinstance(got, str) else got)})
                del sparse
            del dense
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def result(self) -> dict[str, Any]:
        a, dev = self.args, self.device
        vers = versions()
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if cusparselt is not None and cusparselt.is_available():
            vers["cusparselt"] = str(cusparselt.version())
        return {
            "benchmark": "sparse24", "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": dt.date.today().isoformat(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "versions": vers,
            "model": self.model_name,
            "protocol": {
                "matmul": "F.linear(x[tokens, in], W[out, in]) without bias, W = random N(0,1) with the 2 largest "
                          "|w| of every 4 kept; dense W (with its zeros) vs torch.sparse.to_sparse_semi_structured(W); "
                          f"median of {a.reps} CUDA-event timings after {a.warmup} warm-up calls; eager mode",
                "model": f"forward with use_cache=False under no_grad, median of {a.model_reps} CUDA-event "
                         f"timings after {a.warmup} warm-up; dense = the pruned model with its zeros in the same "
                         "dtype; "
                         "'decoder only' runs model.model (no lm_head); max_abs_diff = largest |sparse - dense| of the "
                         "logits (whole model) or last hidden states (decoder)",
                "speedup": "dense_ms / sparse_ms (> 1: the semi-structured weights are faster)",
            },
            "rows": self.rows,
            "wall_s": round(time.perf_counter() - self.t0, 1),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="matmul,model", help="comma-separated: matmul, model")
    p.add_argument("--dtypes", default="float16,bfloat16", help=f"comma-separated of {', '.join(DTYPES)}")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated of {', '.join(BACKENDS)}")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts of the matmul part")
    p.add_argument("--model-shapes", default=",".join(f"{b}x{s}" for b, s in MODEL_SHAPES),
                   help="batch x seqlen of the model part, comma-separated")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30, help="timed calls per matmul configuration")
    p.add_argument("--model-reps", type=int, default=10, help="timed forwards per model configuration")
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes, dense stand-in for the compression, no GPU needed, nothing written")
    p.add_argument("--out", default="benchmarks/results/sparse24.json")
    a = p.parse_args(argv)

    def split(s: str, allowed: Any = None, cast: Callable[[str], Any] = str) -> list[Any]:
        items = [cast(x.strip()) for x in s.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            p.error(f"unknown or empty choice(s) {bad or s!r}; allowed: {', '.join(map(str, allowed or ()))}")
        return items

    def model_shape(s: str) -> tuple[int, int]:
        b, _, n = s.lower().partition("x")
        try:
            return int(b), int(n)
        except ValueError:
            p.error(f"--model-shapes wants BATCHxSEQLEN, got {s!r}")
            raise

    a.parts = split(a.parts, ("matmul", "model"))
    a.dtypes = split(a.dtypes, DTYPES)
    a.backends = split(a.backends, BACKENDS)
    a.tokens = split(a.tokens, cast=int)
    a.model_shapes = split(a.model_shapes, cast=model_shape)
    a.shape_labels = [s[0] for s in SHAPES]

    # Every benchmarked shape must pass the kernels' limits (checked without a GPU).
    for b in a.backends:
        with backend(b):
            for dname in a.dtypes:
                block = sparse24.kernel_block(DTYPES[dname])
                for label, out_f, in_f in SHAPES:
                    if out_f % block[0] or in_f % block[1]:
                        p.error(f"{label} ({out_f} x {in_f}) is refused by {b} for {dname} (block {block})")

    gpu_ok = torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)
    if a.dry_run:
        print(f"dry run on {'cuda' if torch.cuda.is_available() else 'cpu'}: dense stand-in for the compression, "
              "toy sizes, timings meaningless, nothing written")
        a.shape_labels = [s[0] for s in SHAPES[:3]]
        a.tokens = [n for n in a.tokens if n <= 16] or [1]
        a.model_shapes = [(1, 32), (1, 1)]
        a.warmup, a.reps, a.model_reps = 1, 3, 2
    elif not gpu_ok:
        print(f"{sparse24.NEEDS_GPU}; none here (use --dry-run to check the script on this machine)", file=sys.stderr)
        return 2

    bench = Bench(a)
    if "matmul" in a.parts:
        bench.matmul()
    if "model" in a.parts:
        bench.model()
    errors = sum("error" in r for r in bench.rows)
    wall = round(time.perf_counter() - bench.t0, 1)
    if a.dry_run:
        print(f"dry run done in {wall} s: {len(bench.rows)} rows ({errors} with errors), no file written")
    else:
        bench.save()
        print(f"wrote {a.out} in {wall} s: {len(bench.rows)} rows ({errors} with errors)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
