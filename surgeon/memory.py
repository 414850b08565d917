"""How much memory an LLM Surgeon run needs, before it starts, and activation checkpointing for K-FAC.

A K-FAC run holds, besides the weights, one fp32 Kronecker factor pair per prunable linear (about 2 GB
per Llama-2-7B decoder layer), then damped inverses (one linear at a time) and the costs of every layer.
Finding out that they do not fit an hour into calibration is a common way for such runs to fail, so
:func:`plan` estimates the peak of each phase of the loop in :mod:`surgeon.methods.surgeon` from shapes
alone, and :func:`check` logs that estimate and refuses a run that cannot fit before any work is done.
:func:`auto_batch_size` uses the same estimates the other way round: the calibration batch that a run
given no batch size takes is the largest whose estimate fits the device (with a margin, and a cap).

The estimate follows what the loop keeps alive in each phase (``curvature``, ``costs``, ``threshold``,
``update``, the names :meth:`surgeon.methods.base.Context.phase` records), so a benchmark can set
every estimated phase peak beside the measured one. Sizes that are exact (weights, factors, inverses,
costs) are counted exactly; activations of the forward and backward passes are a per-token,
per-layer approximation and the transients of linear algebra a few copies of the largest matrix.

:func:`activation_checkpointing` makes ``model.gradient_checkpointing_enable()`` safe for K-FAC hooks:
a checkpointed layer runs its forward a second time during backward, and the hooks of its linears
would count every input twice.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTO_BATCH_CAP",
    "AUTO_MARGIN",
    "CHECK_ENV",
    "HEADROOM",
    "CheckpointStats",
    "InsufficientMemoryError",
    "Item",
    "MemoryPlan",
    "PHASES",
    "activation_checkpointing",
    "auto_batch_size",
    "check",
    "checkpointing_requested",
    "factor_bytes",
    "plan",
    "sequential_bytes",
    "usable_device_bytes",
    "usable_host_bytes",
]

GiB = 2**30

#: Phases of one LLM Surgeon shot, as the loop names them.
PHASES = ("curvature", "costs", "threshold", "update")

#: Fraction of the usable device memory kept free for allocator fragmentation and the workspaces of
#: cuBLAS/cuSOLVER, which the plan does not itemise.
HEADROOM = 0.05

#: ``SURGEON_MEMORY_CHECK=warn`` turns a refusal into a warning, ``off`` skips the check: the plan is
#: an estimate and a user who knows better must be able to go ahead.
CHECK_ENV = "SURGEON_MEMORY_CHECK"

#: Largest calibration batch (windows) an automatic batch size takes, by device type. On a GPU 8 windows
#: of 2048 tokens keep the matrix units busy (the benchmarks' setting; more only costs memory); on a CPU
#: a few windows per pass already amortise the per-pass overheads.
AUTO_BATCH_CAP = {"cuda": 8, "cpu": 4}

#: Share of the usable memory an automatic batch size may plan to fill: the plan is an estimate.
AUTO_MARGIN = 0.8


class InsufficientMemoryError(MemoryError):
    """The plan's peak exceeds the device memory; the message says what would make it fit."""


@dataclass(frozen=True)
class Item:
    """One consumer of memory: ``nbytes`` on ``where`` ("gpu" or "host") while any of ``phases`` runs."""

    name: str
    nbytes: int
    where: str
    phases: tuple[str, ...]
    note: str = ""


@dataclass
class MemoryPlan:
    """Estimated memory by component and phase; ``peak_gpu_bytes``/``peak_host_bytes`` are the maxima
    over phases of everything alive in the phase."""

    items: list[Item]
    summary: dict[str, Any] = field(default_factory=dict)

    def totals(self, where: str) -> dict[str, int]:
        return {ph: sum(i.nbytes for i in self.items if i.where == where and ph in i.phases) for ph in PHASES}

    def peak(self, where: str) -> tuple[int, str]:
        totals = self.totals(where)
        phase = max(PHASES, key=lambda ph: totals[ph])
        return totals[phase], phase

    @property
    def peak_gpu_bytes(self) -> int:
        return self.peak("gpu")[0]

    @property
    def peak_host_bytes(self) -> int:
        return self.peak("host")[0]

    @property
    def on_device(self) -> str:
        """Where the compute device's memory is counted: "gpu", or "host" for a CPU device."""
        return "host" if str(self.summary.get("device", "cuda")).startswith("cpu") else "gpu"

    def fits(self, device_total: int | float) -> bool:
        """Whether the peak memory of the compute device stays within ``device_total`` bytes."""
        return self.peak(self.on_device)[0] <= device_total

    def largest(self, where: str, phase: str) -> Item | None:
        alive = [i for i in self.items if i.where == where and phase in i.phases]
        return max(alive, key=lambda i: i.nbytes) if alive else None

    def to_dict(self) -> dict[str, Any]:
        gpu, gpu_phase = self.peak("gpu")
        host, host_phase = self.peak("host")
        return {
            **self.summary,
            "peak_gpu_gb": gpu / GiB, "peak_gpu_phase": gpu_phase,
            "peak_host_gb": host / GiB, "peak_host_phase": host_phase,
            "phases_gpu_gb": {k: v / GiB for k, v in self.totals("gpu").items()},
            "phases_host_gb": {k: v / GiB for k, v in self.totals("host").items()},
            "items": [{"name": i.name, "gb": i.nbytes / GiB, "where": i.where, "phases": list(i.phases),
                       **({"note": i.note} if i.note else {})} for i in self.items],
        }

    def __str__(self) -> str:
        s = self.summary
        head = (f"memory plan: {s.get('method', '')} {s.get('structure', '')} on {s.get('device', '')}; "
                f"{s.get('windows', 0)} x {s.get('seqlen', 0)} tokens, {s.get('tokens_per_pass', 0)} per pass; "
                f"compute {s.get('compute_dtype', '')}; factors on {s.get('factors_on', '')}; "
                f"checkpointing {'on' if s.get('checkpointing') else 'off'}")
        width = max([len(i.name) for i in self.items] + [len("peak host")]) + 2
        lines = [head, f"{'component (GiB)':<{width}}{'where':<6}" + "".join(f"{ph:>11}" for ph in PHASES)]
        for i in self.items:
            cells = "".join(f"{_gb(i.nbytes) if ph in i.phases else '':>11}" for ph in PHASES)
            lines.append(f"{i.name:<{width}}{i.where:<6}{cells}")
        for where in ("gpu", "host"):
            tot = self.totals(where)
            if any(tot.values()):
                lines.append(f"{'peak ' + where:<{width}}{'':<6}" + "".join(f"{_gb(tot[ph]):>11}" for ph in PHASES))
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GiB:.2f}"


# -- shapes ---------------------------------------------------------------------------------------------


def factor_bytes(adapter: Any, names: Iterable[str] | None = None) -> int:
    """Bytes of the fp32 K-FAC factors of ``names`` (default: every prunable linear).

    ``G`` is R×R per linear; ``A`` is C×C once per group of linears reading the same input
    (``adapter.input_groups()``), as the collector accumulates it.
    """
    linears = adapter.linears()
    wanted = set(linears if names is None else names)
    total = 0
    for i in range(len(adapter.layers)):
        prefix = f"{adapter.layer_prefix}.{i}."
        for group in adapter.input_groups():
            members = [prefix + n for n in group if prefix + n in wanted]
            if members:
                total += linears[members[0]].in_features ** 2
        total += sum(linears[prefix + n].out_features ** 2 for n in adapter.layer_linear_names() if prefix + n in wanted)
    return 4 * total


def checkpointing_requested(model: nn.Module) -> bool:
    """Whether ``model.gradient_checkpointing_enable()`` (or its successor) was called on ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _activation_bytes(adapter: Any, seqlen: int, s: int, w: int) -> tuple[int, int]:
    """Per token: (bytes a decoder layer keeps for backward, bytes of one layer's input).

    Every matmul keeps its input (once per group of linears sharing it), the outputs are kept by the
    elementwise ops that follow (attention, activation function, gating), plus one intermediate of
    the widest output (the activation before gating) and two normalisations that work in fp32.
    Eager attention also keeps its seqlen×seqlen probabilities per head.
    """
    lin = adapter.layer_linears(0)
    prefix = f"{adapter.layer_prefix}.0."
    ins = sum(lin[prefix + g[0]].in_features for g in adapter.input_groups())
    outs = sum(m.out_features for m in lin.values())
    widest = max(m.out_features for m in lin.values())
    hidden = int(adapter.config.hidden_size)
    per = s * (ins + outs + widest) + 2 * hidden * (8 + w)
    attn = getattr(adapter.config, "_attn_implementation", None) or "eager"
    if attn == "eager":
        heads = int(getattr(adapter.config, "num_attention_heads", 1))
        per += heads * seqlen * (4 + (s if s < 4 else 0))  # fp32 probabilities and their cast
    return per, hidden * w


def _native_threshold() -> bool:
    try:
        from ._backend import backend_name
    except ImportError:
        return True
    return backend_name() != "torch"


# -- the plan ----------------------------------------------------------------------------------------


def plan(
    model: nn.Module,
    config: Any,
    calibration_shape: tuple[int, int] | torch.Size,
    *,
    device: torch.device | str,
    batch_size: int = 1,
    offload_factors: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
    checkpointing: bool | None = None,
    world_size: int | None = None,
    backend: str | None = None,
) -> MemoryPlan:
    """Estimate the memory of an LLM Surgeon run (the first shot: later shots only get smaller).

    ``calibration_shape`` is ``(windows, seqlen)`` of all calibration data; with ``world_size`` > 1
    (default: the initialised process group's) each rank passes over its share. ``offload_factors``
    defaults to the config's; ``checkpointing`` to whether the model has gradient checkpointing on.
    On a CPU device everything is host memory.
    """
    from .adapters import adapter_for
    from . import distributed

    if not hasattr(config, "offload_factors"):
        raise TypeError(f"memory plans cover K-FAC methods (llm-surgeon, k-obd, l-obd), not {config.method!r}")
    device = torch.device(device)
    dev = "gpu" if device.type != "cpu" else "host"
    adapter = adapter_for(model)
    offload = bool(config.offload_factors if offload_factors is None else offload_factors)
    ckpt = checkpointing_requested(model) if checkpointing is None else bool(checkpointing)
    world = distributed.world_size() if world_size is None else int(world_size)
    backend = backend or (distributed.backend() if world > 1 else None)
    windows, seqlen = int(calibration_shape[0]), int(calibration_shape[1])
    local_windows = -(-windows // max(world, 1))
    tokens = min(batch_size, local_windows) * seqlen
    weight_dtype = next(model.parameters()).dtype
    w = _itemsize(weight_dtype)
    s = _itemsize(autocast_dtype) if autocast_dtype is not None else w
    kind = config.structure_kind
    structured = kind == "structured"
    linears = adapter.linears()
    n_layers = len(adapter.layers)
    cur, rest = ("curvature",), ("costs", "threshold", "update")
    items: list[Item] = []

    def add(name: str, nbytes: float, where: str, phases: tuple[str, ...], note: str = "") -> None:
        if nbytes > 0:
            items.append(Item(name, int(nbytes), where, phases, note))

    weights = _weight_bytes(model)
    add("weights", weights, dev, PHASES)

    # curvature: forward + backward of one batch with hooks
    per_layer, layer_input = _activation_bytes(adapter, seqlen, s, w)
    if ckpt:
        add("layer inputs (checkpointed)", n_layers * tokens * layer_input, dev, cur)
        add("activations of one recomputed layer", tokens * per_layer, dev, cur)
    else:
        add("activations kept for backward", n_layers * tokens * per_layer, dev, cur,
            f"{n_layers} layers x {tokens} tokens x {per_layer / 2**10:.0f} KiB")
    add("backward working set", tokens * per_layer, dev, cur, "gradients of one layer's activations")
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    add("logits and loss", tokens * vocab * (s + 12), dev, cur,
        "logits, fp32 log-softmax and its gradient (batch x seqlen x vocab)")
    widest = max(max(m.in_features, m.out_features) for m in linears.values())
    add("hook rows in fp32", 2 * tokens * widest * 4, dev, cur)
    names = [p.linear for g in adapter.structure_groups() for p in g.parts] if structured else list(linears)
    fbytes = factor_bytes(adapter, names)
    biggest = 4 * widest**2
    add("K-FAC factors", fbytes, "host" if offload else dev, PHASES,
        "G: R^2 per linear, A: C^2 per shared input, fp32")
    if getattr(config, "accumulate", "float32") == "float64":
        add("float64 factor sums", 2 * fbytes, "host" if offload else dev, cur, "cast to the fp32 factors after the pass")
    if offload and dev == "gpu":
        add("factor product before offload", biggest, dev, cur)
        add("factor product copies", 2 * biggest, "host", cur, "pageable copy and pinned staging")
    if getattr(config, "equalize", False):
        add("rescaled factor (equalize)", biggest, "host" if offload else dev, cur)
    if world > 1:
        if offload and backend is not None and "nccl" in backend and "gloo" not in backend and dev == "gpu":
            add("all-reduce staging", min(distributed.STAGING_BYTES, biggest), dev, cur)
        add("all-reduce of token counts", 8 * len(names), dev, cur)

    # costs, threshold and update
    # inverses are made one linear at a time (and the last A^-1 kept for the linears sharing it)
    if structured:
        inv = 0
        for g in adapter.structure_groups():
            for p in g.parts:
                m = linears[p.linear]
                inv = max(inv, 4 * (m.out_features if p.axis == "row" else m.in_features) ** 2)
        add("damped inverses (one linear)", 2 * inv, dev, rest, "the current inverse and the kept A^-1")
        n_struct = sum(g.count for g in adapter.structure_groups())
        add("structure costs", 4 * n_struct, dev, rest)
        add("structure costs on host", 8 * n_struct, "host", ("threshold",))
    else:
        inv = max(4 * (m.out_features**2 + m.in_features**2) for m in linears.values())
        add("damped inverses (one linear)", inv, dev, rest, "G^-1 and A^-1 of the current linear")
        numel = sum(m.weight.numel() for m in linears.values())
        add("per-weight costs", 4 * numel, "host" if offload else dev, rest,
            "kept in host memory when the factors are offloaded")
        if _native_threshold():
            add("costs copied for the threshold", 4 * numel, "host", ("threshold",), "the native kernel reads host arrays")
        else:
            add("threshold sort keys (int64)", 2 * 8 * max(m.weight.numel() for m in linears.values()), dev,
                ("threshold",))
        sparsity = float(getattr(config, "sparsity", 0.5))
        add("selected positions (int64)", 8 * sparsity * numel, "host", ("threshold", "update"))
        add("removal masks", numel, dev, ("threshold", "update"))
    largest_w = max(m.weight.numel() for m in linears.values())
    add("inversion transients", 10 * biggest, dev, ("costs",),
        "of the largest factor: device copy, live sub-matrix, damped copy, Cholesky, inverse, scatter indices")
    solves = 0
    if not structured:
        corr = getattr(config, "correlation", "full") if getattr(config, "update", True) else "none"
        # row: padded batches of at most 2**25 elements, a few copies; full: one chunk's system
        max_in = max(m.in_features for m in linears.values())
        row = min(2**25, largest_w * max_in)
        solves = 3 * 4 * (row if corr == "row" else int(getattr(config, "max_correlate", 2000)) ** 2)
    add("update transients", (3 if structured else 5) * 4 * largest_w + solves, dev, ("update",),
        "fp32 copies of the largest weight matrix and its update, and the OBS solves")
    if kind != "structured":
        add("cost transients", 3 * 4 * largest_w, dev, ("costs", "threshold"))

    add("calibration tokens", 8 * windows * seqlen, "host", PHASES)
    rss = _current_rss()
    if dev == "host":
        rss = max(0, rss - weights)
    add("process (resident now)", rss, "host", PHASES, "interpreter, libraries, CUDA context")

    summary = {
        "method": getattr(config, "method", ""), "structure": config.structure, "device": str(device),
        "windows": windows, "seqlen": seqlen, "world_size": world, "windows_per_rank": local_windows,
        "batch_size": batch_size, "tokens_per_pass": tokens,
        "compute_dtype": str(autocast_dtype or weight_dtype).replace("torch.", ""),
        "weight_dtype": str(weight_dtype).replace("torch.", ""),
        "factors_on": "host" if offload or dev == "host" else "gpu", "offload_factors": offload,
        "checkpointing": ckpt, "factor_gb": fbytes / GiB,
    }
    return MemoryPlan(items=items, summary=summary)


# -- the check before a run ------------------------------------------------------------------------


def usable_device_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device`` (what it holds already counts as usable)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_reserved(device)) * (1 - HEADROOM))


def usable_host_bytes() -> int | None:
    """Bytes this process can still hold in host memory: what the kernel reports available
    (``MemAvailable``) plus what the process holds already (which the plan counts); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return int((available + _current_rss()) * (1 - HEADROOM))


def _weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def sequential_bytes(model: nn.Module, calibration_shape: tuple[int, int] | torch.Size, *, batch_size: int,
                     autocast_dtype: torch.dtype | None = None) -> int:
    """Estimated peak of a layer-sequential method (SparseGPT, Wanda, ADMM, FLAP) on its device.

    The pipeline keeps every window's input of the current block, one statistic per input of a block
    (at most C×C fp32) and the weights, whatever the batch; one batch at a time goes through one block
    without a backward pass (counted like the activations a backward would keep, which bounds it).
    """
    from .adapters import adapter_for

    adapter = adapter_for(model)
    windows, seqlen = int(calibration_shape[0]), int(calibration_shape[1])
    w = _itemsize(next(model.parameters()).dtype)
    s = _itemsize(autocast_dtype) if autocast_dtype is not None else w
    hidden = int(adapter.config.hidden_size)
    lin = adapter.layer_linears(0)
    per_layer, _ = _activation_bytes(adapter, seqlen, s, w)
    tokens = min(batch_size, windows) * seqlen
    widest = max(max(m.in_features, m.out_features) for m in lin.values())
    fixed = _weight_bytes(model) + windows * seqlen * hidden * s + sum(4 * m.in_features**2 for m in lin.values())
    return fixed + tokens * (per_layer + 2 * widest * 4 + 2 * hidden * s)


def auto_batch_size(
    model: nn.Module,
    config: Any,
    calibration_shape: tuple[int, int] | torch.Size,
    *,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    device_total: int | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """The calibration batch size for a run given none: the largest (up to ``cap``, default
    :data:`AUTO_BATCH_CAP` for the device, and at most this rank's windows) whose estimated peak stays
    within :data:`AUTO_MARGIN` of the device's usable memory; 1 when none does (then :func:`check`
    explains what would fit). K-FAC methods are estimated with :func:`plan`, the others with
    :func:`sequential_bytes`. Under ``torchrun`` every rank takes the smallest choice of any rank.

    Returns the record a report keeps: ``value`` (the batch size), the estimate behind it and the limits.
    """
    from . import distributed

    device = torch.device(device)
    cap = int(cap if cap is not None else AUTO_BATCH_CAP.get(device.type, AUTO_BATCH_CAP["cuda"]))
    if cap < 1:
        raise ValueError(f"the batch size cap must be at least 1, got {cap}")
    windows = int(calibration_shape[0])
    local = -(-windows // distributed.world_size())
    kfac = hasattr(config, "offload_factors")
    if device_total is None:
        device_total = usable_host_bytes() if device.type == "cpu" else usable_device_bytes(device)
    budget = None if device_total is None else device_total * AUTO_MARGIN

    def need(b: int) -> int:
        if kfac:
            p = plan(model, config, calibration_shape, device=device, batch_size=b, autocast_dtype=autocast_dtype)
            return p.peak(p.on_device)[0]
        extra = max(0, _current_rss() - _weight_bytes(model)) if device.type == "cpu" else 0  # as plan() counts it
        return extra + sequential_bytes(model, calibration_shape, batch_size=b, autocast_dtype=autocast_dtype)

    value, estimate, fits = 1, 0, False
    for b in range(max(1, min(cap, local)), 0, -1):
        value, estimate = b, need(b)
        fits = budget is None or estimate <= budget
        if fits:
            break
    if distributed.active():
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        value = int(t.item())
    return {"value": value, "auto": True, "cap": cap, "windows_per_rank": local,
            "basis": "memory plan" if kfac else "layer-sequential estimate",
            "estimated_peak_gb": round(estimate / GiB, 3), "fits": fits,
            "usable_gb": None if device_total is None else round(device_total / GiB, 3), "margin": AUTO_MARGIN}


def check(ctx: Any, *, device_total: int | None = None) -> MemoryPlan | None:
    """Plan ``ctx``'s run, log the plan, and refuse a run whose estimate cannot fit the device.

    Only K-FAC methods are planned (others return None). ``device_total`` (bytes) replaces the
    measured usable memory of the device (for tests, or to plan for another card). A run that does not
    fit raises :class:`InsufficientMemoryError` naming what would make it fit, unless the factors are
    already offloaded (then it warns) or ``SURGEON_MEMORY_CHECK`` is ``warn``/``off``.
    """
    from . import distributed

    mode = os.environ.get(CHECK_ENV, "error").lower()
    if mode == "off" or not hasattr(ctx.config, "offload_factors"):
        return None
    args = dict(device=ctx.device, batch_size=ctx.batch_size, autocast_dtype=ctx.autocast_dtype)
    shape = tuple(ctx.calibration.shape)
    p = plan(ctx.model, ctx.config, shape, **args)
    ctx.report.extra["memory_plan"] = p.to_dict()
    if distributed.is_main():
        ctx.log.info("%s", p)
    total = device_total if device_total is not None else usable_device_bytes(ctx.device)
    if total is None or p.fits(total):
        return p
    where = p.on_device
    peak, phase = p.peak(where)
    top = p.largest(where, phase)
    msg = (f"estimated peak {'GPU' if where == 'gpu' else 'host'} memory {peak / GiB:.1f} GiB (phase '{phase}', "
           f"largest: {top.name if top else '?'} {(top.nbytes if top else 0) / GiB:.1f} GiB) exceeds the "
           f"{total / GiB:.1f} GiB usable on {ctx.device}")
    hints = []
    if where == "gpu" and not p.summary["offload_factors"]:
        alt = plan(ctx.model, ctx.config, shape, **args, offload_factors=True)
        hints.append(f"offload_factors=True in the config keeps the {p.summary['factor_gb']:.1f} GiB of K-FAC "
                     f"factors in host memory (estimated peak then {alt.peak_gpu_bytes / GiB:.1f} GiB)")
    if phase == "curvature":
        if ctx.batch_size > 1:
            alt = plan(ctx.model, ctx.config, shape, **(args | {"batch_size": 1}))
            hints.append(f"fewer tokens per batch (batch_size=1: {alt.peak(where)[0] / GiB:.1f} GiB)")
        if not p.summary["checkpointing"]:
            hints.append("model.gradient_checkpointing_enable() to keep only each layer's input for backward")
    else:
        hints.append("fewer layers pruned per run or a larger device: the costs of every layer are held at once")
    text = msg + ". Options: " + "; ".join(hints) + f" (set {CHECK_ENV}=warn to run anyway)."
    if p.summary["offload_factors"] or mode == "warn":
        ctx.log.warning("%s", text)
        return p
    raise InsufficientMemoryError(text)


# -- activation checkpointing that K-FAC hooks can live with -------------------------------------------


@dataclass
class CheckpointStats:
    """What :func:`activation_checkpointing` did: layers wrapped and layer recomputations seen."""

    layers: int = 0
    recomputes: int = 0


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, layers: Iterable[nn.Module] | None = None) -> Iterator[CheckpointStats]:
    """Checkpoint ``layers`` in the way the model asks for, with module hooks seeing each forward once.

    Does nothing unless gradient checkpointing was turned on for ``model`` (the Hugging Face flag
    ``gradient_checkpointing``). Inside, the flags are off (the library's checkpointing only runs in
    training mode, and the K-FAC collector refuses it) and each flagged layer (default: each module
    whose flag is set and that has a checkpointing function) is run through non-reentrant
    :func:`torch.utils.checkpoint.checkpoint` instead, in any mode. The first forward runs as usual:
    forward hooks see the inputs, and hooks put on outputs get their gradients, because backward
    goes through that forward's graph. The recomputation only refills saved tensors, and it runs with
    the forward hooks of the layer's submodules silenced, so nothing is counted twice. Global module
    hooks (``register_module_forward_hook``) are not silenced.
    """
    stats = CheckpointStats()
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not flagged:
        yield stats
        return
    if layers is None:
        targets = [m for m in flagged if _is_checkpoint_layer(m)]
    else:
        layers = list(layers)
        targets = [m for m in layers if getattr(m, "gradient_checkpointing", False) is True] or layers
    saved_forward = {id(m): m.__dict__.get("forward") for m in targets}
    try:
        for m in flagged:
            m.gradient_checkpointing = False
        for m in targets:
            m.forward = _checkpointed(m, m.forward, stats)
        stats.layers = len(targets)
        yield stats
    finally:
        for m in targets:
            if saved_forward[id(m)] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = saved_forward[id(m)]
        for m in flagged:
            m.gradient_checkpointing = True


def _is_checkpoint_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older layouts: a flagged module with a checkpointing function that is not a model
        return callable(getattr(module, "_gradient_checkpointing_func", None)) and not hasattr(module, "config")
    return isinstance(module, GradientCheckpointingLayer)


def _checkpointed(layer: nn.Module, forward: Any, stats: CheckpointStats) -> Any:
    from torch.utils.checkpoint import checkpoint

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _recomputing(layer, stats)

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextlib.contextmanager
def _recomputing(layer: nn.Module, stats: CheckpointStats) -> Iterator[None]:
    stats.recomputes += 1
    subs = [m for m in layer.modules() if m is not layer]
    # Module hooks live in these ordered dicts; swapping in empty ones silences them for the
    # recomputation, and a hook handle removed meanwhile still finds its original dict.
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in subs]
    try:
        for m in subs:
            m._forward_pre_hooks = OrderedDict()
            m._forward_hooks = OrderedDict()
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks = pre
            m._forward_hooks = post
