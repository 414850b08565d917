"""Layer-sequential calibration: one decoder block at a time, on the inputs the pruned blocks before it produce.

Methods that need only each linear's input activations (SparseGPT, Wanda, ADMM, FLAP) never run the
whole model after the first step. The inputs of block 0 are captured once; then, for each block:

1. :func:`collect` runs the block over every cached batch with forward hooks on its linears, feeding
   pluggable :class:`Statistic` accumulators (Gram matrices, column norms, means and variances);
2. the method prunes the block (in place, or by replacing its linears);
3. :meth:`LayerInputs.run` runs the *pruned* block again, and its outputs become the next block's
   inputs, so later blocks compensate for the error of earlier ones (as SparseGPT and Wanda do).

:func:`for_each_layer` drives the loop; a method only writes the per-block step::

    def step(s: LayerStep) -> None:
        stats = s.collect(Gram.of)             # {full linear name: Gram}; one per shared input
        for name, lin in s.linears.items():
            ...                                # prune lin.weight from stats[name].sum
    for_each_layer(ctx, step)

Capturing relies on as little of ``transformers`` as possible: a forward pre-hook on block 0 takes
whatever positional and keyword arguments the model passes (attention mask, position embeddings,
position ids, cache position, ...) and stops the forward with a private exception. Cache arguments
(``cache``, ``past_key_values``, ...) are replayed as ``None`` with ``use_cache=False``; a block may
return a tensor or a tuple whose first element is the hidden state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "ColumnNorms",
    "Gram",
    "LayerInputs",
    "LayerStep",
    "Moments",
    "Statistic",
    "collect",
    "for_each_layer",
    "output_error",
    "record_module",
    "timed",
]

_CACHE_KWARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


class _Captured(Exception):
    """Raised by the pre-hook on block 0 to stop the model's forward once the inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


# -- statistics ------------------------------------------------------------------------------------

class Statistic(Protocol):
    """Accumulates something about a linear's inputs; ``x`` is [tokens, in_features] in fp32."""

    def update(self, x: torch.Tensor) -> None: ...


class Gram:
    """``sum`` = Σₙ xₙxₙᵀ (C×C, fp32) over ``n`` tokens: the activation curvature of least-squares pruning."""

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n = 0

    @classmethod
    def of(cls, linear: nn.Linear) -> Gram:
        return cls(linear.in_features, linear.weight.device)

    def update(self, x: torch.Tensor) -> None:
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]


class ColumnNorms:
    """``sq`` = Σₙ xₙⱼ² per input channel over ``n`` tokens; ``norms`` = ‖X_j‖₂ (Wanda's activation factor)."""

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.sq = torch.zeros(dim, dtype=torch.float32, device=device)
        self.n = 0

    @classmethod
    def of(cls, linear: nn.Linear) -> ColumnNorms:
        return cls(linear.in_features, linear.weight.device)

    def update(self, x: torch.Tensor) -> None:
        self.sq += x.square().sum(0)
        self.n += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


class Moments:
    """Per input channel mean, variance and sum of squares over all tokens (FLAP's fluctuation metric).

    Batches are merged with Chan's parallel update, so the variance stays accurate in fp32 even when
    the mean is large compared with the spread.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.mean = torch.zeros(dim, dtype=torch.float32, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.sq = torch.zeros_like(self.mean)
        self.n = 0

    @classmethod
    def of(cls, linear: nn.Linear) -> Moments:
        return cls(linear.in_features, linear.weight.device)

    def update(self, x: torch.Tensor) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = (x - mb).square().sum(0)
        total = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / total)
        self.m2 += m2b + delta.square() * (self.n * nb / total)
        self.sq += x.square().sum(0)
        self.n = total

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Population variance, or the sample variance (divided by n − 1) when ``unbiased``."""
        return self.m2 / max(self.n - (1 if unbiased else 0), 1)


# -- cached block inputs ---------------------------------------------------------------------------

def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return type(obj)(*(_map_tensors(o, fn) for o in obj)) if hasattr(obj, "_fields") else tuple(
            _map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality, exact on tensors (used to share identical masks/embeddings across batches)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable == are simply not shared
        return a is b


def _first(out: Any) -> torch.Tensor:
    """The hidden state of a block's output, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerInputs:
    """The inputs of the current block for every calibration batch.

    ``hidden[b]`` is batch ``b``'s hidden state (kept on ``device``, or on the CPU when ``offload``),
    ``extra[b]`` is ``(args, kwargs)``: the other arguments the model passed to its blocks (on
    ``device``; identical ones are stored once). ``autocast_dtype`` (None: off) applies to every
    block run; statistics are fp32 regardless.
    """

    hidden: list[torch.Tensor]
    extra: list[tuple[tuple, dict]]
    device: torch.device
    offload: bool = False
    autocast_dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        """``(hidden, args, kwargs)`` per batch, all on ``device``."""
        for h, (args, kwargs) in zip(self.hidden, self.extra):
            yield h.to(self.device, non_blocking=True), args, kwargs

    @classmethod
    @torch.no_grad()
    def capture(cls, ctx: Any, *, offload: bool = False, autocast: bool = True) -> LayerInputs:
        """Run the model on every calibration batch up to its first decoder block, keeping that block's inputs."""
        model, layer0 = ctx.model, ctx.adapter.layers[0]
        embed = model.get_input_embeddings()
        embed_device = embed.weight.device if embed is not None else ctx.device

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _Captured(args, dict(kwargs))

        inputs = cls([], [], ctx.device, offload, ctx.autocast_dtype if autocast else None)
        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in ctx.batches():
                try:
                    with inputs.autocast():
                        model(input_ids=batch.to(embed_device), use_cache=False)
                except _Captured as c:
                    inputs._add(c.args, c.kwargs)
                else:
                    raise RuntimeError("the model finished a forward without calling its first decoder layer")
        finally:
            handle.remove()
        return inputs

    def _add(self, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, args = args[0], tuple(args[1:])
        else:
            hidden = kwargs.pop("hidden_states")
        for k in _CACHE_KWARGS & kwargs.keys():
            kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        extra = _map_tensors((args, kwargs), lambda t: t.to(self.device))
        for seen in reversed(self.extra):
            if _same(seen, extra):
                extra = seen
                break
        self.extra.append(extra)
        self.hidden.append(hidden.detach().to("cpu" if self.offload else self.device))

    @torch.no_grad()
    def run(self, layer: nn.Module, *, update: bool = True) -> None:
        """Run ``layer`` over every batch; with ``update`` its outputs replace the stored hidden states."""
        for b, (h, args, kwargs) in enumerate(self):
            with self.autocast():
                out = _first(layer(h, *args, **kwargs))
            if update:
                self.hidden[b] = out.detach().to(self.hidden[b].device)


# -- statistics from hooks -------------------------------------------------------------------------

def collect(
    layer: nn.Module,
    inputs: LayerInputs,
    linears: dict[str, nn.Linear],
    make_stat: Callable[[nn.Linear], Statistic],
    *,
    groups: Sequence[Sequence[str]] = (),
) -> dict[str, Statistic]:
    """Run ``layer`` over ``inputs`` and accumulate a statistic of each linear's input.

    ``make_stat(linear)`` builds one accumulator (e.g. ``Gram.of``, ``ColumnNorms.of``, ``Moments.of``,
    or any object with ``update(x)``); every batch's input reaches it as a [tokens, in_features] fp32
    tensor. Names in one of ``groups`` read the same input (q/k/v, gate/up): the group is hooked once,
    on its first member present in ``linears``, and all its members map to the same object. The block's
    stored inputs are not changed.
    """
    stats: dict[str, Statistic] = {}
    handles = []

    def feed(stat: Statistic) -> Callable:
        def hook(_module: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach()
            stat.update(x.reshape(-1, x.shape[-1]).float())
        return hook

    named = [tuple(n for n in g if n in linears) for g in groups]
    grouped = {n for g in named for n in g}
    named += [(n,) for n in linears if n not in grouped]
    try:
        for g in named:
            if not g:
                continue
            stat = make_stat(linears[g[0]])
            stats.update(dict.fromkeys(g, stat))
            handles.append(linears[g[0]].register_forward_hook(feed(stat)))
        inputs.run(layer, update=False)
    finally:
        for h in handles:
            h.remove()
    for n in linears:
        _check_finite(n, stats[n])
    return {n: stats[n] for n in linears}


def _check_finite(name: str, stat: Statistic) -> None:
    """Refuse statistics with NaN/Inf (overflowing activations), naming the linear, before any pruning
    decision is made from them."""
    for attr, value in vars(stat).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"non-finite activations (NaN/Inf) reach {name} ({attr} of its input statistics)")


# -- the layer loop --------------------------------------------------------------------------------

@dataclass
class LayerStep:
    """What a method sees of one block: its index, module, prunable linears (full names) and inputs.

    ``groups`` lists full names of linears that read the same input (from the adapter's
    ``input_groups``). ``linears`` is read from the adapter when accessed, so it reflects linears a
    method has replaced.
    """

    ctx: Any
    index: int
    layer: nn.Module
    inputs: LayerInputs
    groups: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return self.ctx.adapter.layer_linears(self.index)

    def collect(self, make_stat: Callable[[nn.Linear], Statistic], names: Sequence[str] | None = None,
                ) -> dict[str, Statistic]:
        """:func:`collect` over this block's linears (or the subset ``names``), timed as phase ``statistics``."""
        lin = self.linears
        if names is not None:
            lin = {n: lin[n] for n in names}
        with self.ctx.phase("statistics"):
            return collect(self.layer, self.inputs, lin, make_stat, groups=self.groups)


def _offload_auto(ctx: Any) -> bool:
    """Offload when the cached activations would take more than 40% of the free GPU memory."""
    if ctx.device.type != "cuda":
        return False
    hidden = getattr(ctx.model.config, "hidden_size", None) or ctx.model.get_input_embeddings().weight.shape[1]
    need = ctx.calibration.numel() * hidden * 4
    free, _ = torch.cuda.mem_get_info(ctx.device)
    return need > 0.4 * free


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


def for_each_layer(
    ctx: Any,
    fn: Callable[[LayerStep], None],
    *,
    offload: bool | str = "auto",
    autocast: bool = True,
    desc: str | None = None,
    checkpoint: bool = False,
) -> None:
    """Call ``fn(step)`` for every decoder block in order, on inputs produced by the blocks already pruned.

    ``checkpoint``: after each block, hand ``{"next_layer": i + 1}`` to ``ctx.checkpoint`` (for methods
    that prune block by block). A run resumed from such a checkpoint replays the blocks before
    ``next_layer`` (already pruned in the loaded model) only to rebuild the inputs of the next one.

    ``offload``: keep cached activations on the CPU between uses (``"auto"``: when they would not fit
    comfortably on the GPU). ``autocast``: run blocks under ``ctx.autocast()`` (statistics stay fp32).
    A block that is not on ``ctx.device`` is moved there for its step and moved back afterwards, so a
    model kept on the host is onloaded one block at a time. The model is in eval mode throughout.
    """
    if offload == "auto":
        offload = _offload_auto(ctx)
    adapter = ctx.adapter
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        with ctx.phase("capture"):
            inputs = LayerInputs.capture(ctx, offload=bool(offload), autocast=autocast)
        n = len(adapter.layers)
        start = int((ctx.resume_state or {}).get("next_layer", 0)) if checkpoint else 0
        for i in ctx.tqdm(range(n), desc=desc or ctx.config.method, unit="layer"):
            layer = adapter.layers[i]
            home = _device_of(layer)
            if home is not None and home != ctx.device:
                layer.to(ctx.device)
            prefix = f"{adapter.layer_prefix}.{i}"
            groups = [tuple(f"{prefix}.{n}" for n in g) for g in adapter.input_groups()]
            if i >= start:
                fn(LayerStep(ctx, i, layer, inputs, groups))
            if i + 1 < n:
                with ctx.phase("forward"):
                    inputs.run(layer, update=True)
            if home is not None and home != ctx.device:
                layer.to(home)
            if checkpoint and i >= start and ctx.checkpoint is not None:
                ctx.checkpoint("layer", {"next_layer": i + 1})
    finally:
        ctx.model.train(was_training)


# -- per-module records ----------------------------------------------------------------------------

def output_error(w0: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """‖XWᵀ − XW₀ᵀ‖² / ‖XW₀ᵀ‖² from the Gram matrix XᵀX (no activations needed); 0 for a silent layer."""
    w0, w, gram = w0.float(), w.float(), gram.float()
    d = w - w0
    num = ((d @ gram) * d).sum()
    den = ((w0 @ gram) * w0).sum()
    return float(num / den) if float(den) > 0 else 0.0


def record_module(ctx: Any, name: str, **fields: Any) -> None:
    """Merge ``fields`` (e.g. ``time_s``, ``error``) into the report's record of module ``name``."""
    ctx.report.modules.setdefault(name, {}).update(fields)


@contextlib.contextmanager
def timed(ctx: Any, name: str) -> Iterator[dict[str, Any]]:
    """Time a module's pruning and record ``time_s`` (plus whatever the body puts in the yielded dict)."""
    rec: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        record_module(ctx, name, time_s=time.perf_counter() - t0, **rec)
