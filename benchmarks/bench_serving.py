"""Serving speed of structurally pruned models at Llama-2-7B shape: prefill and decode tokens/s, dense vs pruned.

    python benchmarks/bench_serving.py                                 # uniform 90/80/70% shapes; H200: ~2 min
    python benchmarks/bench_serving.py --report r90.json r80.json r70.json --align 1 64
    python benchmarks/bench_serving.py --tiny                          # CPU, toy sizes, seconds, nothing committed

Model: ``LlamaForCausalLM`` of Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, 32 KV heads, MLP 11008,
vocab 32000, untied lm_head), random weights (normal, std 0.02; norms 1) in bf16, SDPA attention. It is
built on the meta device, resized to the pruned shapes with ``adapter_for(model).apply_layer_shapes`` (how
``surgeon.io.load_pruned`` rebuilds a saved model), then materialised on the GPU with ``to_empty`` and
filled in place: no host copy of the weights. One model at a time is held.

Per-layer shapes (KV groups and MLP channels of each layer) come from, in this order of rows:
- ``--report PATH ...``: ``report.json`` of structured runs (or folders holding one), one row per file.
  ``modules[name]["shape"]`` gives each layer's kept fraction of query heads (``q_proj`` rows) and of MLP
  channels (``gate_proj`` rows); the fractions are applied to the benchmark model's 32 KV groups and 11008
  channels, source layer ``floor((j + 0.5) * L_source / 32)`` for layer ``j`` (relative depth). Attention
  holds a larger share of a layer at 7B than in SmolLM2, so the same fractions would leave another size:
  all MLP fractions of a report are multiplied by one factor (``shapes_source`` says which) so that the
  model keeps the report's size (``--no-match-size``: fractions as they are); the row's ``target`` is that
  size to 0.01. A report of a model of this very shape is reproduced exactly.
- ``--shapes-json PATH ...``: per-layer shapes written by hand or by another tool (format below); its
  models are matched to their ``target`` in the same way where they give one.
- ``--uniform SIZE ...``: every layer alike: ``round(size * 32)`` KV groups, MLP width chosen so that the
  layer keeps ``size`` of its linear weights (default 0.9 0.8 0.7 when no report or JSON is given).
MLP widths are then rounded to the nearest multiple of each ``--align`` value (one row per value;
rows whose shapes come out the same are measured once).

Measurements, each the median of ``--reps`` timings after ``--warmup`` runs (CUDA events on the GPU):
- prefill: ``--batch`` x ``--seqlen`` random tokens (default 4 x 2048), ``use_cache=False``, only the last
  position's logits (``logits_to_keep=1``), under ``torch.no_grad``.
- decode at each ``--decode-batches`` size (default 1 and 16): one new token per sequence after a
  ``--context``-token prompt (default 512) already in a static KV cache (this file's ``SlotCache``: one
  buffer per layer, sized from that layer's own KV head count). Each step writes the same cache slot and
  attends to all ``context + 1`` positions, so every step does the same work at one context length. The
  step (embeddings to logits, through transformers' own forward) is captured once in a CUDA graph and
  replayed ``--decode-steps`` times per timing, so Python and launch overheads do not hide the matrix
  work (``torch.compile`` is not used: compiling every shape would cost more than the whole run). On the
  CPU the step runs eagerly. transformers' own ``StaticCache`` would fit pruned layers too (its
  ``StaticLayer`` allocates each layer lazily from its first key states, in 5.17 and 5.24 alike); the
  benchmark passes positions and a 4-D mask itself so that the captured step runs none of transformers'
  mask code, and ``SlotCache`` keeps the step's position fixed.
- ``peak_gpu_gb`` (weights included), ``weight_bytes`` (all parameters), ``linear_params`` (prunable
  linears only), ``achieved`` (their fraction of the dense model's).
- checks per model, recorded in ``checks``: SDPA logits against eager attention (pruned head counts run
  correctly through SDPA), the cached decode step against a plain forward over prompt + token (the cache,
  positions and masks are right), the ops of one decode step that read values back to the host (none,
  or the graph capture would fail; counted on the CPU as well), and the graph's replay against the eager
  step. A row whose check fails
  (beyond 1e-4 in fp32, 0.1 in bf16: rounding stays far below) gets an ``error``, as does a model that
  fails to run; the others are still measured and the exit status is 1.

Then an alignment section: prefill and batch-16 decode of uniform ``--sweep-size`` (0.8) models with
``--sweep-heads`` (28) heads per layer and MLP widths at the nearest multiples of 1, 2, 4, ... 256 of the
exact width for that size, and 8399, 8400, 8448, so that the default alignment can be chosen from
measurements.

JSON format of ``--shapes-json``: ``{"models": [{"label": "...", "target": 0.8, "layers": [...]}, ...]}``,
or a single model's ``{"layers": [...]}``, or a bare list of layers. A layer is ``{"heads": 28, "mlp": 8448}``
(counts in the benchmark model; ``kv_heads`` optional, for a grouped-query base) or ``{"attn_kept": 0.875,
"mlp_kept": 0.76}`` (fractions). Lists of another length are mapped by relative depth.

Writes ``benchmarks/results/serving.json`` and ``.md`` after every row (``--tiny``: a file in the temp folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.report import Report, versions  # noqa: E402
from table import render  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
TINY_RUN = dict(seqlen=128, context=32, decode_steps=4, reps=2, warmup=1, dtype="fp32", device="cpu")
ISSUE_WIDTHS = (8399, 8400, 8448)  # the widths of issue 15's first measurement (Llama-2-7B shape only)
MULTIPLES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INIT_STD = 0.02
COLUMNS = ("method", "variant", "structure", "target_kind", "target", "achieved", "prefill_tokens_per_s",
           "prefill_speedup", "decode_tokens_per_s_b1", "decode_speedup_b1", "decode_tokens_per_s_b16",
           "decode_speedup_b16", "weight_bytes", "peak_gpu_gb", "linear_params", "heads_min", "heads_max",
           "kv_heads_min", "kv_heads_max", "mlp_min", "mlp_max", "align", "decode_mode", "error")


START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


# -- shapes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """The dense model's sizes, and the linear weights a layer keeps at a given shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int

    @classmethod
    def of(cls, cfg: dict[str, int]) -> Dims:
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                   cfg["num_key_value_heads"], cfg["intermediate_size"])

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def groups(self) -> int:
        """Query heads per KV head: a pruned layer keeps whole groups (see ``surgeon.adapters.llama``)."""
        return self.heads // self.kv_heads

    def layer_params(self, kv: int, mlp: int) -> int:
        return self.hidden * self.head_dim * 2 * kv * (self.groups + 1) + 3 * self.hidden * mlp

    @property
    def dense_layer(self) -> int:
        return self.layer_params(self.kv_heads, self.mlp)


@dataclass
class Plan:
    """One model to measure: per-layer (KV groups, MLP channels) and where those came from."""

    method: str
    variant: str
    target: float
    source: str
    align: int
    layers: list[tuple[int, int]]


def round_to(x: float, multiple: int, cap: int) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple), never above the dense width ``cap``."""
    return min(cap, max(multiple, multiple * round(x / multiple)))


def uniform_layers(dims: Dims, size: float, align: int) -> list[tuple[int, int]]:
    """Every layer alike: the same fraction of KV groups, the MLP width that brings the layer to ``size``."""
    kv = min(dims.kv_heads, max(1, round(size * dims.kv_heads)))
    width = (size * dims.dense_layer - dims.layer_params(kv, 0)) / (3 * dims.hidden)
    if width < 1:
        raise ValueError(f"size {size}: {kv} KV groups alone hold more than {size:.0%} of a layer")
    return [(kv, round_to(width, align, dims.mlp))] * dims.layers


def scaled_layers(fractions: list[tuple[float, float]], dims: Dims, align: int) -> list[tuple[int, int]]:
    """Apply per-layer kept fractions (KV groups, MLP channels) of a source model to ``dims``, by relative depth."""
    n = len(fractions)
    out = []
    for j in range(dims.layers):
        kv_frac, mlp_frac = fractions[min(n - 1, int((j + 0.5) * n / dims.layers))]
        kv = min(dims.kv_heads, max(1, round(kv_frac * dims.kv_heads)))
        out.append((kv, round_to(mlp_frac * dims.mlp, align, dims.mlp)))
    return out


def matched_layers(fractions: list[tuple[float, float]], dims: Dims, align: int,
                   target: float) -> tuple[list[tuple[int, int]], float]:
    """:func:`scaled_layers` with every MLP fraction times one factor, chosen so that the model keeps ``target``
    of its linear weights (attention's share of a layer differs between models); returns the layers and factor."""
    def at(c: float) -> list[tuple[int, int]]:
        return scaled_layers([(a, min(1.0, m * c)) for a, m in fractions], dims, align)

    if abs(size_of(dims, at(1.0)) - target) < 1e-3:
        return at(1.0), 1.0
    lo, hi = 0.0, 1.0 / min(m for _, m in fractions)
    if size_of(dims, at(lo)) > target:
        raise ValueError(f"size {target}: the attention these fractions keep is already more at this shape")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size_of(dims, at(mid)) < target else (lo, mid)
    best = min((lo, hi), key=lambda c: abs(size_of(dims, at(c)) - target))
    return at(best), round(best, 4)


def report_fractions(path: Path) -> tuple[list[tuple[float, float]], Report]:
    """Per source layer, the kept fraction of KV groups and of MLP channels recorded in a structured run's report."""
    if path.is_dir():
        path = path / "report.json"
    rep = Report.load(path)
    per_layer: dict[int, dict[str, dict[str, Any]]] = {}
    for name, rec in rep.modules.items():
        if "shape" not in rec:
            raise ValueError(f"{path}: module {name} has no 'shape' (a report written before shapes were recorded?)")
        per_layer.setdefault(int(rec["layer"]), {})[rec["type"]] = rec
    if sorted(per_layer) != list(range(len(per_layer))) or not per_layer:
        raise ValueError(f"{path}: layers {sorted(per_layer)} are not 0..n-1")

    def kept(rec: dict[str, Any]) -> float:
        rows, cols = rec["shape"]
        return rows * cols / rec["params_before"]

    fractions = []
    for i in range(len(per_layer)):
        recs = per_layer[i]
        missing = {"self_attn.q_proj", "mlp.gate_proj"} - set(recs)
        if missing:
            raise ValueError(f"{path}: layer {i} lacks {sorted(missing)}; only Llama-family reports are supported")
        # query heads kept (q_proj rows): whole KV groups and query slots alike, the 7B shape has no GQA
        fractions.append((kept(recs["self_attn.q_proj"]), kept(recs["mlp.gate_proj"])))
    if all(f == (1.0, 1.0) for f in fractions):
        raise ValueError(f"{path}: no layer was resized (an unstructured or unpruned run?)")
    return fractions, rep


def json_models(path: Path, dims: Dims) -> list[tuple[str, float | None, list[tuple[float, float]]]]:
    """(label, target, per-layer kept fractions) of each model in a shapes file (format: module docstring)."""
    d = json.loads(path.read_text())
    models = d["models"] if isinstance(d, dict) and "models" in d else [d if isinstance(d, dict) else {"layers": d}]
    out = []
    for k, m in enumerate(models):
        fractions = []
        for i, layer in enumerate(m["layers"]):
            where = f"{path}: model {k}, layer {i}"
            if "attn_kept" in layer or "mlp_kept" in layer:
                kv_frac, mlp_frac = float(layer.get("attn_kept", 1.0)), float(layer.get("mlp_kept", 1.0))
            else:
                heads = int(layer.get("heads", dims.heads))
                kv = int(layer.get("kv_heads", heads // dims.groups))
                if heads != kv * dims.groups:
                    raise ValueError(f"{where}: {heads} heads with {kv} KV heads; the base model has "
                                     f"{dims.groups} query heads per KV head and pruning keeps whole groups")
                kv_frac, mlp_frac = kv / dims.kv_heads, int(layer.get("mlp", dims.mlp)) / dims.mlp
            if not (0 < kv_frac <= 1 and 0 < mlp_frac <= 1):
                raise ValueError(f"{where}: kept fractions must lie in (0, 1], got {kv_frac}, {mlp_frac}")
            fractions.append((kv_frac, mlp_frac))
        out.append((m.get("label", f"{path.name}[{k}]"), m.get("target"), fractions))
    return out


def plans(args: argparse.Namespace, dims: Dims) -> list[Plan]:
    """The dense model, then one model per shape source and alignment (duplicates dropped)."""
    # (method, label, size to keep or None, per-layer fractions, source); a report's target is its size to 0.01
    sources = [(rep.method or "llm-surgeon", f"report {p}", rep.size, fractions,
                f"report {p} ({rep.model or 'model ?'}, {len(fractions)} layers)")
               for p in args.report for fractions, rep in [report_fractions(Path(p))]]
    sources += [("synthetic", label, target, fractions, f"shapes file {p} ({len(fractions)} layers)")
                for p in args.shapes_json for label, target, fractions in json_models(Path(p), dims)]
    out = [Plan("dense", "dense", 1.0, "dense", 1, [(dims.kv_heads, dims.mlp)] * dims.layers)]
    for align in args.align:
        for method, label, size, fractions, source in sources:
            layers, factor = scaled_layers(fractions, dims, align), 1.0
            if size is not None and args.match_size:
                layers, factor = matched_layers(fractions, dims, align, size)
            target = round(size, 2) if method != "synthetic" else size or achieved(dims, layers)
            out.append(Plan(method, f"{label}, align {align}", target,
                            f"{source}; kept fractions per layer by relative depth, MLP fractions x {factor}", align,
                            layers))
        for size in args.uniform:
            out.append(Plan("synthetic", f"uniform {size}, align {align}", size, "uniform (every layer alike)", align,
                            uniform_layers(dims, size, align)))
    seen: set[tuple[tuple[int, int], ...]] = set()
    unique = []
    for plan in out:
        key = tuple(plan.layers)
        if key in seen:
            log(f"skipped {plan.variant}: same shapes as a model measured before")
            continue
        seen.add(key)
        unique.append(plan)
    return unique


def size_of(dims: Dims, layers: list[tuple[int, int]]) -> float:
    """Fraction of the dense model's linear weights that these layers keep."""
    return sum(dims.layer_params(kv, m) for kv, m in layers) / (dims.layers * dims.dense_layer)


def achieved(dims: Dims, layers: list[tuple[int, int]]) -> float:
    return round(size_of(dims, layers), 4)


def sweep_widths(args: argparse.Namespace, dims: Dims) -> list[tuple[int, list[int]]]:
    """MLP widths of the alignment section, each with the multiples it is the nearest width for."""
    kv = args.sweep_heads // dims.groups
    exact = (args.sweep_size * dims.dense_layer - dims.layer_params(kv, 0)) / (3 * dims.hidden)
    widths: dict[int, list[int]] = {}
    for m in MULTIPLES:
        widths.setdefault(round_to(exact, m, dims.mlp), []).append(m)
    for w in args.sweep_widths or (ISSUE_WIDTHS if dims == Dims.of(LLAMA2_7B) else ()):
        widths.setdefault(w, [])
    return sorted(widths.items())


def runs(layers: list[tuple[int, int]]) -> str:
    """Per-layer shapes with repeats folded: ``(28, 8448) x 30, (32, 11008) x 2``."""
    out: list[list[Any]] = []
    for shape in layers:
        if out and out[-1][0] == shape:
            out[-1][1] += 1
        else:
            out.append([shape, 1])
    return ", ".join(f"{shape} x {n}" if n > 1 else str(shape) for shape, n in out)


def power_of_two_divisor(n: int) -> int:
    return min(n & -n, 256)


# -- models ---------------------------------------------------------------------------------------


def build(cfg: dict[str, int], layers: list[tuple[int, int]], device: torch.device, dtype: torch.dtype,
          seed: int) -> Any:
    """Random-weight model at the given per-layer shapes, materialised straight on ``device``."""
    import transformers

    config = transformers.LlamaConfig(**cfg, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter_for(model).apply_layer_shapes([{"attn": kv, "mlp": m} for kv, m in layers])
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # linears and embeddings
                p.normal_(0.0, INIT_STD, generator=gen)
            else:  # RMSNorm scales
                p.fill_(1.0)
    # the rotary embedding's frequencies are buffers computed at construction: rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    other = [n for n, _ in model.named_buffers() if not n.startswith("model.rotary_emb.")]
    if other:
        raise RuntimeError(f"buffers left uninitialised by to_empty: {other}")
    return model.eval()


def layer_counts(model: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) of each layer, read from the linears themselves."""
    out = []
    for layer in model.model.layers:
        hd = layer.self_attn.head_dim
        out.append((layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd,
                    layer.mlp.gate_proj.out_features))
    return out


def cache_kwarg(model: Any) -> str:
    """Name of the cache argument of the model's forward (``cache`` in newer transformers 5.x)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class SlotCache:
    """A static KV cache whose buffers each fit their own layer (pruned layers hold fewer KV heads).

    A layer's buffers are allocated at its first ``update``, from the shape of its key states; ``slots``
    (a device tensor set by the caller) says which positions the next tokens are written to. Only
    ``update`` is needed: the caller passes positions and a 4-D mask, so transformers asks nothing else.
    """

    def __init__(self, length: int):
        self.length = length
        self.slots: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.length, d)
            self.values[layer_idx] = value_states.new_zeros(b, h, self.length, value_states.shape[-1])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key_states)
        v.index_copy_(2, self.slots, value_states)
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())


class Decoder:
    """``batch`` sequences with a ``context``-token prompt in a :class:`SlotCache`, and one fixed decode step."""

    def __init__(self, model: Any, batch: int, context: int, seed: int):
        dev = model.device
        self.model, self.kw = model, cache_kwarg(model)
        self.cache = SlotCache(context + 1)
        gen = torch.Generator(dev).manual_seed(seed)
        vocab = model.config.vocab_size
        self.prompt = torch.randint(vocab, (batch, context), device=dev, generator=gen)
        self.token = torch.randint(vocab, (batch, 1), device=dev, generator=gen)
        q = torch.arange(context, device=dev)
        # causal over the prompt; slot `context` (written by every decode step) is never read by the prompt
        mask = (torch.arange(context + 1, device=dev)[None, :] <= q[:, None]).expand(batch, 1, -1, -1)
        self.cache.slots = q
        model(input_ids=self.prompt, attention_mask=mask, position_ids=q.expand(batch, -1), use_cache=True,
              logits_to_keep=1, **{self.kw: self.cache})
        self.cache.slots = torch.tensor([context], device=dev)
        self.position = torch.full((batch, 1), context, device=dev)
        self.mask = torch.ones(batch, 1, 1, context + 1, dtype=torch.bool, device=dev)

    def step(self) -> torch.Tensor:
        return self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                          use_cache=True, **{self.kw: self.cache}).logits

    def reference(self) -> torch.Tensor:
        """Logits of the new token from a plain forward over prompt + token, without any cache."""
        ids = torch.cat([self.prompt, self.token], dim=1)
        return self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``.item()``, ``bool(t)``, data-dependent
    shapes): a step with none can be captured in a CUDA graph; this holds on the CPU too, before any GPU run."""

    OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name.startswith(self.OPS):
            self.found[name] = self.found.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def sdpa_vs_eager(model: Any, tokens: int, seed: int) -> float:
    """Relative difference of the logits through SDPA and through eager attention (pruned heads included)."""
    ids = torch.randint(model.config.vocab_size, (1, tokens), device=model.device,
                        generator=torch.Generator(model.device).manual_seed(seed))
    sdpa = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("eager")
    try:
        eager = model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_attn_implementation("sdpa")
    return rel_diff(sdpa, eager)


# -- timing ---------------------------------------------------------------------------------------


def median_s(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int, calls: int = 1) -> float:
    """Median seconds of one call of ``fn``, over ``reps`` timings of ``calls`` calls each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


class Peak:
    """Peak GPU memory of a phase, in GB (0 on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gb = 0.0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gb = round(torch.cuda.max_memory_allocated() / 1e9, 2)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill(model: Any, args: argparse.Namespace, device: torch.device) -> float:
    ids = torch.randint(model.config.vocab_size, (args.batch, args.seqlen), device=device,
                        generator=torch.Generator(device).manual_seed(args.seed))
    s = median_s(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, args.reps, args.warmup)
    return args.batch * args.seqlen / s


def decode(model: Any, batch: int, args: argparse.Namespace, device: torch.device,
           checks: dict[str, Any]) -> float:
    """Tokens/s of the fixed decode step at ``batch``; fills ``checks`` with the correctness checks."""
    dec = Decoder(model, batch, args.context, args.seed + batch)
    with HostReads() as reads:
        eager = dec.step()
    checks[f"host_reads_in_step_b{batch}"] = reads.found
    if batch == min(args.decode_batches):
        checks["decode_vs_forward_rel_diff"] = rel_diff(eager[:, -1], dec.reference()[:, -1])
    step: Callable[[], torch.Tensor] = dec.step
    mode = "eager"
    if args.compile:
        # inductor fuses the norms, rotary, activations and residual adds of every layer, so the step is
        # mostly its matrix products; its kernels are then captured in the graph like the eager ones
        torch._dynamo.reset()  # a fresh cache per model and batch: no guards of the models before
        mode_arg = None if args.compile_mode == "default" else args.compile_mode
        step = torch.compile(dec.step, dynamic=False, mode=mode_arg)
        checks[f"compiled_vs_eager_rel_diff_b{batch}"] = rel_diff(step(), eager)
        mode = "compiled"
    run: Callable[[], Any] = step
    graph = None
    checks[f"decode_mode_b{batch}"] = mode
    if args.graph:
        try:
            graph, out = capture(step, max(args.warmup, 2))
            graph.replay()
            checks[f"graph_vs_eager_rel_diff_b{batch}"] = rel_diff(out, eager)
            checks[f"decode_mode_b{batch}"] = "cuda-graph" + (" of the compiled step" if args.compile else "")
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - eager numbers (marked so) beat none
            checks[f"decode_mode_b{batch}"] = f"{mode}: graph capture failed ({type(e).__name__}: {e})"
            log(f"graph capture failed, decoding eagerly: {type(e).__name__}: {e}")
            torch.cuda.synchronize()
    s = median_s(run, device, args.reps, args.warmup, calls=args.decode_steps)
    checks[f"kv_cache_gb_b{batch}"] = round(dec.cache.nbytes() / 1e9, 3)
    del dec, graph, run
    return batch / s


def capture(step: Callable[[], torch.Tensor], warmup: int) -> tuple[Any, torch.Tensor]:
    """A CUDA graph of one call of ``step`` (warmed up on a side stream first, as capture requires) and its output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def check_error(checks: dict[str, Any], dtype: torch.dtype) -> str | None:
    """What failed, if any check did: rounding stays far below these limits, a wrong cache or mask does not."""
    tol = 1e-4 if dtype == torch.float32 else 0.1
    bad = {k: v for k, v in checks.items() if "rel_diff" in k and not v <= tol}
    reads = {k: v for k, v in checks.items() if k.startswith("host_reads") and v}
    errors = [f"results differ from their references by more than {tol}: {bad}" if bad else "",
              f"the decode step reads values back to the host, which a CUDA graph cannot capture: {reads}" if reads
              else ""]
    return "; ".join(e for e in errors if e) or None


def measure(plan: Plan, args: argparse.Namespace, cfg: dict[str, int], device: torch.device, dtype: torch.dtype,
            decode_batches: list[int], check: bool) -> dict[str, Any]:
    """Build one model at ``plan``'s shapes, time it, and return its row (the model is freed on return)."""
    dims = Dims.of(cfg)
    free(device)
    peaks: dict[str, float] = {}
    t = time.perf_counter()
    with Peak(device) as pk:
        model = build(cfg, plan.layers, device, dtype, args.seed)
    build_s = time.perf_counter() - t
    peaks["build"] = pk.gb
    counts = layer_counts(model)
    linear = adapter_for(model).prunable_params()
    row: dict[str, Any] = {
        "method": plan.method, "structure": "none" if plan.method == "dense" else "structured",
        "variant": plan.variant, "target_kind": "size", "target": plan.target,
        "achieved": round(linear / (dims.layers * dims.dense_layer), 4), "shapes_source": plan.source,
        "align": plan.align,
        "heads_min": min(c[0] for c in counts), "heads_max": max(c[0] for c in counts),
        "kv_heads_min": min(c[1] for c in counts), "kv_heads_max": max(c[1] for c in counts),
        "mlp_min": min(c[2] for c in counts), "mlp_max": max(c[2] for c in counts),
        "linear_params": linear,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "build_s": round(build_s, 2),
    }
    checks: dict[str, Any] = {}
    with torch.no_grad():
        if check:
            checks["sdpa_vs_eager_rel_diff"] = sdpa_vs_eager(model, min(64, args.context), args.seed)
        with Peak(device) as pk:
            row["prefill_tokens_per_s"] = round(prefill(model, args, device), 1)
        peaks["prefill"] = pk.gb
        for b in decode_batches:
            with Peak(device) as pk:
                row[f"decode_tokens_per_s_b{b}"] = round(decode(model, b, args, device, checks), 1)
            peaks[f"decode_b{b}"] = pk.gb
            free(device)
    del model
    free(device)
    modes = sorted({v for k, v in checks.items() if k.startswith("decode_mode_")})
    row["decode_mode"] = modes[0] if len(modes) == 1 else "; ".join(modes)
    if check and (err := check_error(checks, dtype)):
        row["error"] = err
    row["peak_gpu_gb"] = max(peaks.values())
    row["peak_gpu_gb_phases"] = peaks
    row["checks"] = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in checks.items()}
    row["layers"] = [list(c) for c in counts]
    return row


def add_speedups(row: dict[str, Any], dense: dict[str, Any] | None) -> None:
    if dense is None:
        return
    for k in [k for k in row if k.endswith("tokens_per_s") or "tokens_per_s_b" in k]:
        if k in dense:
            row[k.replace("tokens_per_s", "speedup")] = round(row[k] / dense[k], 3)


# -- the run --------------------------------------------------------------------------------------


class Results:
    """The results file, rewritten (JSON and markdown) after every row so a cut-short run keeps its rows."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, int], device: torch.device):
        self.out = Path(args.out)
        dims = Dims.of(cfg)
        graph = "one decode step captured in a torch.cuda.CUDAGraph and replayed" if args.graph else "eager steps"
        self.data: dict[str, Any] = {
            "benchmark": "serving", "command": " ".join(["python"] + sys.argv), "date": dt.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": versions(),
            "model": (f"LlamaForCausalLM, random {args.dtype} weights (normal std {INIT_STD}), hidden {dims.hidden}, "
                      f"{dims.layers} layers, {dims.heads} heads, {dims.kv_heads} KV heads, MLP {dims.mlp}, vocab "
                      f"{cfg['vocab_size']}, untied lm_head, SDPA attention"),
            "protocol": {
                "prefill": f"{args.batch} x {args.seqlen} random tokens, use_cache=False, logits_to_keep=1, no_grad; "
                           f"median of {args.reps} timings after {args.warmup} warm-up calls",
                "decode": f"batch {' and '.join(map(str, args.decode_batches))}: one token per sequence after a "
                          f"{args.context}-token prompt in a per-layer static KV cache ({args.context + 1} slots; every "
                          f"step writes slot {args.context} and attends to all of them); {graph} "
                          f"{args.decode_steps} times per timing; median of {args.reps} timings",
                "cache": "per-layer buffers sized from each layer's own KV heads (SlotCache); transformers' StaticLayer "
                         "(5.17 and 5.24) also allocates each layer lazily from its first key states, so it fits pruned "
                         "layers; positions and a 4-D mask are passed in, so the captured step runs none of "
                         "transformers' mask code",
                "torch.compile": (f"the decode step is compiled by torch.compile (inductor, dynamic=False, mode "
                                  f"{args.compile_mode}) and then "
                                  "captured in the graph: the elementwise work between the matrix products is fused"
                                  if args.compile else
                                  "not used (--compile uses it for decode): compiling each of the many shapes costs "
                                  "more time than the run has; the graph replay removes the Python and launch "
                                  "overheads, not the many small kernels between the matrix products"),
                "speedup": "pruned over dense tokens/s, same run",
                "shapes": "report: kept fractions of KV groups and MLP channels per layer, by relative depth, MLP "
                          "fractions times one factor so that the model keeps the report's size (shapes_source); "
                          "uniform: round(size * KV groups) groups, the MLP width for the size; MLP widths rounded "
                          "to the nearest multiple of `align`",
                "peak_gpu_gb": "max_memory_allocated over a phase (build, prefill, decode per batch), weights included",
            },
            "rows": [],
            "alignment": [],
        }

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data[section].append(row)
        keys = ("variant", "mlp_width", "achieved", "prefill_tokens_per_s", "prefill_speedup",
                "decode_tokens_per_s_b1", "decode_tokens_per_s_b16", "decode_speedup_b16", "peak_gpu_gb", "error")
        log(f"{section}: " + " | ".join(f"{k}={row[k]}" for k in keys if k in row))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=2) + "\n")
        self.out.with_suffix(".md").write_text(render(self.data, sections=("alignment",), columns=COLUMNS))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", nargs="+", default=[], metavar="PATH",
                   help="report.json of structured runs (or folders holding one), one model each")
    p.add_argument("--shapes-json", nargs="+", default=[], metavar="PATH", help="per-layer shapes files")
    p.add_argument("--uniform", nargs="+", type=float, default=None, metavar="SIZE",
                   help="uniform models of these sizes (default 0.9 0.8 0.7 when no --report or --shapes-json)")
    p.add_argument("--align", nargs="+", type=int, default=[1], help="round MLP widths to multiples of these")
    p.add_argument("--no-match-size", dest="match_size", action="store_false",
                   help="apply a report's fractions as they are, even where the model then keeps another size")
    p.add_argument("--batch", type=int, default=4, help="prefill batch")
    p.add_argument("--seqlen", type=int, default=2048, help="prefill tokens per sequence")
    p.add_argument("--context", type=int, default=512, help="prompt tokens in the cache before the decode step")
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps per timing")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-graph", dest="graph", action="store_false", help="decode eagerly on the GPU too")
    p.add_argument("--compile", action="store_true",
                   help="decode with the step compiled by torch.compile (inductor) before the graph capture; "
                        "one compilation per model and batch size (about a minute each at 7B shape)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode for --compile: the default, or 'max-autotune-no-cudagraphs' (also tries "
                        "Triton kernels for the small-batch matrix products; much longer to compile)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the alignment section")
    p.add_argument("--sweep-size", type=float, default=0.8)
    p.add_argument("--sweep-heads", type=int, default=None, help="heads per layer (default: 7/8 of the heads)")
    p.add_argument("--sweep-widths", nargs="+", type=int, default=None,
                   help="extra MLP widths (default at 7B shape: 8399 8400 8448)")
    p.add_argument("--sweep-decode-batches", nargs="+", type=int, default=[16])
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads of the base model (default: all heads)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help=f"toy model {TINY} on the CPU, fp32, short inputs: proves the script, numbers mean nothing")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/serving.json)")
    p.add_argument("--list", action="store_true", help="print each model's per-layer shapes and exit")
    a = p.parse_args(argv)
    if a.tiny:
        for k, v in TINY_RUN.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    a.out = a.out or (Path(tempfile.gettempdir()) / "serving-tiny.json" if a.tiny
                      else ROOT / "benchmarks" / "results" / "serving.json")
    if a.uniform is None:
        a.uniform = [] if a.report or a.shapes_json else [0.9, 0.8, 0.7]
    a.graph = a.graph and a.device.startswith("cuda")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = dict(TINY if args.tiny else LLAMA2_7B)
    if args.kv_heads:
        if cfg["num_attention_heads"] % args.kv_heads:
            raise SystemExit(f"--kv-heads {args.kv_heads} does not divide {cfg['num_attention_heads']} heads")
        cfg["num_key_value_heads"] = args.kv_heads
    dims = Dims.of(cfg)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    todo = plans(args, dims)
    heads = args.sweep_heads or dims.groups * max(1, round(dims.kv_heads * 7 / 8))
    if heads % dims.groups:
        raise SystemExit(f"--sweep-heads {heads} is not a whole number of {dims.groups}-head groups")
    args.sweep_heads = heads
    sweep = [(Plan("synthetic", f"uniform {args.sweep_size}, {heads} heads, MLP {width}", args.sweep_size,
                   "alignment section", 1, [(heads // dims.groups, width)] * dims.layers), multiples)
             for width, multiples in (sweep_widths(args, dims) if args.sweep else [])]
    if args.list:
        for plan, _ in [(p, None) for p in todo] + sweep:
            print(f"{plan.variant}: target {plan.target}, achieved {achieved(dims, plan.layers)}, "
                  f"(KV groups, MLP) x layers: {runs(plan.layers)}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or on a GPU")
    res = Results(args, cfg, device)
    log(f"{len(todo)} models and {len(sweep)} in the alignment section, device {res.data['device']}, out {args.out}")
    dense: dict[str, Any] | None = None
    failed = 0
    for plan, multiples in [(p, None) for p in todo] + sweep:
        log(f"building {plan.variant}")
        in_sweep = multiples is not None
        try:
            row = measure(plan, args, cfg, device, dtype, args.sweep_decode_batches if in_sweep else args.decode_batches,
                          check=not in_sweep)
        except Exception as e:  # noqa: BLE001 - record the failure, measure the other models
            row = {"method": plan.method, "variant": plan.variant, "target": plan.target,
                   "error": f"{type(e).__name__}: {e}"}
            free(device)
        failed += "error" in row
        if plan.method == "dense" and "error" not in row:
            dense = row
        add_speedups(row, dense)
        if not in_sweep:
            res.add("rows", row)
            continue
        keep = ("variant", "achieved", "heads_min", "linear_params", "prefill_tokens_per_s", "prefill_speedup",
                *[k for k in row if k.startswith(("decode_tokens_per_s_b", "decode_speedup_b"))], "peak_gpu_gb",
                "decode_mode", "error")
        width = plan.layers[0][1]
        res.add("alignment", {"mlp_width": width, "power_of_two_divisor": power_of_two_divisor(width),
                              "nearest_for_multiples": ",".join(map(str, multiples)),
                              **{k: row[k] for k in keep if k in row}})
    log(f"done, {failed} models failed" if failed else "done")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
