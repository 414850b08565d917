"""K-FAC curvature factors of linear layers, gathered with hooks during forward and backward passes.

For ``y = W x`` with ``W ∈ R^{R×C}`` the Fisher block of ``W`` is approximated by ``G ⊗ A``
(``vec(W)`` row-major), with ``A = (1/N) Σ_n a_n a_nᵀ`` over the layer's inputs and
``G = (1/N) Σ_n g_n g_nᵀ`` over the loss gradients at its outputs, N the number of real (unmasked)
calibration tokens. Both are accumulated in fp32 whatever precision the model runs in.

Scale convention: ``g_n`` is the gradient, with respect to the output at token n, of the *summed*
next-token loss of the batch (sum over sequences and positions, never a mean). G then does not depend
on the sequence length or the batch size. Using the mean sequence loss instead would multiply every G
by 1/L²; with relative damping that scales every cost of every layer by the same factor, so the global
ranking of structures is unchanged either way.

Shared inputs: q/k/v projections read the very same hidden-state tensor (gate/up too). The collector
recognises this within a forward pass (the identical tensor object at the same version) and
accumulates one A for the group; the group's members get the same A tensor object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .linalg import damped_inverse

__all__ = ["KFACCollector", "KFactors", "cast_factors", "equalize_norms", "estimate_kfac"]

_IGNORE = -100


@dataclass
class KFactors:
    """Kronecker factors of one linear layer: ``F ≈ G ⊗ A``.

    ``A`` (C×C) and ``G`` (R×R) are already averaged over ``n_tokens`` tokens. Modules with shared
    inputs hold the same ``A`` tensor object: treat factors as read-only.
    """

    A: Tensor
    G: Tensor
    n_tokens: int

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KFactors:
        """A copy on ``device`` / in ``dtype`` (the same object when nothing changes)."""
        A = self.A.to(device=device, dtype=dtype)
        G = self.G.to(device=device, dtype=dtype)
        if A is self.A and G is self.G:
            return self
        return KFactors(A=A, G=G, n_tokens=self.n_tokens)

    def inverses(self, damp_g: float, damp_a: float, *, name: str = "layer") -> tuple[Tensor, Tensor]:
        """Damped inverses ``(Ginv, Ainv)`` (relative damping; dead rows/columns zero)."""
        return (
            damped_inverse(self.G, damp_g, name=f"{name}.G"),
            damped_inverse(self.A, damp_a, name=f"{name}.A"),
        )


class KFACCollector:
    """Context manager that accumulates K-FAC factors of ``modules`` over forward+backward passes.

    Inside the context, every forward call of a module adds ``Σ a aᵀ`` of its input, and a hook on
    its output adds ``Σ g gᵀ`` of the output gradient when backward runs. Call
    :meth:`set_token_mask` before each batch with padding so that only real tokens count, run the
    forward and backward passes, and read :meth:`factors` at the end.

    ``device`` holds the accumulators (default: the device of the activations); ``offload=True``
    keeps them on the CPU instead: each batch's product is formed on the activations' device and
    added to the host copy, so device memory never holds more than one layer's product.
    ``share_inputs=False`` accumulates A separately for every module (same values, more memory).
    ``tf32=True`` lets CUDA form the fp32 products with TF32 tensor cores: the products are a large
    share of the collection time once batches hold several windows, and their rounding (10-bit
    mantissa per product, fp32 sums) averages out over tokens far below typical damping.

    ``gradients=False`` collects A only and reports G = I (activations-only curvature, as L-OBD uses):
    forward passes suffice.

    Gradient checkpointing is not supported: recomputed forwards would count their inputs twice.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        device: torch.device | str | None = None,
        offload: bool = False,
        share_inputs: bool = True,
        tf32: bool = False,
        gradients: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not modules:
            raise ValueError("no modules to collect curvature for")
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name}: expected nn.Linear, got {type(module).__name__}")
        self._modules = dict(modules)
        self._device = torch.device("cpu") if offload else (torch.device(device) if device is not None else None)
        self._share = share_inputs
        self._tf32 = tf32
        self._gradients = gradients
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor sums must be float32 or float64, got {dtype}")
        self._dtype = dtype
        self._A: dict[str, Tensor] = {}  # keyed by the module that owns the (possibly shared) accumulator
        self._G: dict[str, Tensor] = {}
        self._nA: dict[str, int] = {}
        self._nG: dict[str, int] = {}
        self._owner: dict[str, str] = {}  # module -> module whose A accumulator it reads
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()  # input tensor -> (version, owner)
        self._mask: Tensor | None = None
        self._handles: list[Any] = []
        self._staging: dict[tuple[tuple[int, ...], torch.dtype], Tensor] = {}
        self._active = False
        self._result: dict[str, KFactors] | None = None

    # -- context ------------------------------------------------------------------------------------
    def __enter__(self) -> KFACCollector:
        if self._active:
            raise RuntimeError("collector is already active")
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        except BaseException:
            self._remove_hooks()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- public -------------------------------------------------------------------------------------
    @property
    def shared_inputs(self) -> dict[str, str]:
        """``{module: owner}`` for every module whose A is the accumulator of another module."""
        return {name: owner for name, owner in self._owner.items() if owner != name}

    def set_token_mask(self, mask: Tensor | None) -> None:
        """Boolean mask of real tokens (e.g. ``attention_mask``, shape ``[b, L]``) for the next batch.

        ``None`` (or an all-true mask) counts every token. The mask is captured at forward time, so
        the backward hooks of a batch use the mask its forward pass saw.
        """
        if mask is not None:
            mask = mask.bool()
            if bool(mask.all()):
                mask = None
        self._mask = mask

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first module whose accumulated A or G is not finite.

        The diagonal of a sum of outer products is a sum of squares, so a single NaN/Inf in any
        activation or gradient (or an overflow) shows up there: checking C + R numbers per module
        per batch is enough, instead of every element of every activation.
        """
        diagonals: dict[torch.device, list[Tensor]] = {}
        for acc in (*self._A.values(), *self._G.values()):
            diagonals.setdefault(acc.device, []).append(acc.diagonal())
        # One reduction (and one device sync) per device; the per-module search runs only on failure.
        if all(bool(torch.isfinite(torch.cat(d)).all()) for d in diagonals.values()):
            return
        for kind, accs, key in (("activations (A)", self._A, self._owner), ("output gradients (G)", self._G, None)):
            for name in self._modules:
                owner = name if key is None else key.get(name)
                acc = accs.get(owner) if owner is not None else None
                if acc is not None and not bool(torch.isfinite(acc.diagonal()).all()):
                    raise ValueError(f"non-finite {kind} in module '{name}'")

    def factors(self) -> dict[str, KFactors]:
        """The averaged factors of every module; finalises the collector (no more accumulation).

        The accumulators are divided in place (no second copy of every factor is made).
        """
        if self._result is not None:
            return dict(self._result)
        self.check_finite()
        for name in self._modules:
            owner = self._owner.get(name)
            if owner is None or (self._gradients and name not in self._G):
                raise RuntimeError(
                    f"no statistics for module '{name}': run forward and backward passes inside the collector"
                )
            if self._nA[owner] == 0:
                raise RuntimeError(f"module '{name}': every token was masked")
            if self._gradients and self._nG[name] != self._nA[owner]:
                raise RuntimeError(
                    f"module '{name}': {self._nA[owner]} tokens in forward passes but {self._nG[name]} in "
                    "backward passes (was every forward followed by a backward of the loss?)"
                )
        for owner, acc in self._A.items():
            acc.div_(self._nA[owner])
        for name, acc in self._G.items():
            acc.div_(self._nG[name])
        result = {}
        for name in self._modules:
            owner = self._owner[name]
            A = self._A[owner]
            G = self._G[name] if self._gradients else torch.eye(self._modules[name].out_features, device=A.device,
                                                                 dtype=A.dtype)
            result[name] = KFactors(A=A, G=G, n_tokens=self._nA[owner])
        self._result = result
        self._A, self._G, self._staging = {}, {}, {}
        return dict(result)

    # -- hooks --------------------------------------------------------------------------------------
    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            if not inputs or not isinstance(inputs[0], Tensor):
                raise ValueError(f"{name}: expected the input tensor as the first positional argument")
            mask = self._mask
            self._accumulate_input(name, inputs[0], mask)
            if self._gradients and isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(name, mask))

        return hook

    def _grad_hook(self, name: str, mask: Tensor | None) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not self._active:
                return
            self._accumulate(self._G, self._nG, name, self._rows(name, grad, mask))

        return hook

    def _accumulate_input(self, name: str, x: Tensor, mask: Tensor | None) -> None:
        if self._result is not None:
            raise RuntimeError("factors() was already called: the collector is finalised")
        owner = name
        if self._share:
            entry = self._seen.get(x)
            if entry is not None and entry[0] == x._version:
                owner = entry[1]
            else:
                self._seen[x] = (x._version, name)
        previous = self._owner.setdefault(name, owner)
        if previous != owner:
            raise RuntimeError(
                f"module '{name}' shared its input with '{previous}' in an earlier pass but with "
                f"'{owner}' now; use share_inputs=False for models whose data flow changes between passes"
            )
        if owner == name:
            self._accumulate(self._A, self._nA, name, self._rows(name, x, mask))

    @staticmethod
    def _rows(name: str, t: Tensor, mask: Tensor | None) -> Tensor:
        rows = t.detach().reshape(-1, t.shape[-1])
        if mask is not None:
            if mask.numel() != rows.shape[0]:
                raise ValueError(f"{name}: token mask has {mask.numel()} entries for {rows.shape[0]} tokens")
            rows = rows[mask.reshape(-1).to(rows.device)]
        return rows.float()

    def _accumulate(self, accs: dict[str, Tensor], counts: dict[str, int], name: str, rows: Tensor) -> None:
        target = self._device or rows.device
        acc = accs.get(name)
        tf32 = self._tf32 and rows.device.type == "cuda"
        if tf32:
            precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
        try:
            # Hooks run inside the caller's autocast region, which would turn the product into bf16.
            with torch.autocast(device_type=rows.device.type, enabled=False):
                if acc is not None and acc.device == rows.device and acc.dtype == rows.dtype:
                    acc.addmm_(rows.T, rows)
                else:  # each batch's product in fp32; float64 sums are exact whatever their order
                    prod = rows.T @ rows
                    if acc is None:
                        accs[name] = prod.to(target, dtype=self._dtype)
                    else:
                        acc.add_(self._to_host(prod) if target.type == "cpu" else prod.to(target))
        finally:
            if tf32:
                torch.set_float32_matmul_precision(precision)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    def _to_host(self, prod: Tensor) -> Tensor:
        """Copy a device product to the host through a reused pinned buffer (about twice as fast)."""
        if prod.device.type != "cuda":
            return prod.to("cpu")
        key = (tuple(prod.shape), prod.dtype)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = torch.empty(prod.shape, dtype=prod.dtype, pin_memory=True)
        return buf.copy_(prod)


# -- one call: forward + backward over calibration batches ---------------------------------------------


def estimate_kfac(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Tensor | Mapping[str, Tensor]],
    *,
    fisher: str = "empirical",
    seed: int = 0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    offload: bool = False,
    share_inputs: bool = True,
    tf32: bool = False,
    gradients: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: Any = None,
) -> dict[str, KFactors]:
    """K-FAC factors of ``modules`` from forward+backward passes of ``model`` over ``batches``.

    ``batches`` yields ``input_ids`` (LongTensor ``[b, L]`` or ``[L]``) or mappings with
    ``input_ids`` and an optional ``attention_mask`` (padding is excluded from A and G).
    ``fisher="empirical"`` backpropagates the summed next-token loss of the true labels;
    ``"sampled"`` draws each label from the model's own predictive distribution (the true Fisher),
    seeded by ``generator`` or ``seed``. ``autocast_dtype`` runs the model under autocast; factors
    stay fp32 (``dtype=torch.float64`` sums them in float64: exact up to the final rounding, so the
    same windows give the same factors in any order or split over data-parallel ranks).
    ``device``/``offload``/``share_inputs``/``tf32``/``gradients`` are passed to
    :class:`KFACCollector`; with ``gradients=False`` only forward passes run (G = I).
    ``progress`` is a callable ``(i, n)`` (``n`` is None for unsized iterables) or has ``update(1)``.

    The factors do not depend on how windows are grouped into batches (the loss is a sum), so
    several windows per batch are free to use and amortise the per-call overhead of small models.

    Parameters are frozen during the passes and the input embeddings' output is made to require
    grad instead: gradients still reach every layer output, but no weight gradient is computed or
    left behind (less memory and about a third less backward work). ``requires_grad`` flags and the
    train/eval mode are restored afterwards; the model runs in eval mode (no dropout).
    """
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError("disable gradient checkpointing: recomputed forwards would count inputs twice")
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if callable(get_embed) else None
    first = next(model.parameters())
    model_device = embed.weight.device if isinstance(getattr(embed, "weight", None), Tensor) else first.device
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = None
    try:
        model.eval()
        if embed is not None:
            for p, _ in flags:
                p.requires_grad_(False)
            handle = embed.register_forward_hook(_require_grad)
        with KFACCollector(modules, device=device, offload=offload, share_inputs=share_inputs, tf32=tf32,
                           gradients=gradients, dtype=dtype) as col:
            with torch.set_grad_enabled(gradients):
                for i, batch in enumerate(batches):
                    ids, attn = _unpack(batch, model_device)
                    col.set_token_mask(attn)
                    with torch.autocast(
                        device_type=model_device.type,
                        dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None,
                    ):
                        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
                    if gradients:
                        logits = _logits(out)
                        if fisher == "sampled" and generator is None:
                            generator = torch.Generator(device=logits.device).manual_seed(seed)
                        loss = _summed_lm_loss(logits, ids, attn, generator if fisher == "sampled" else None)
                        loss.backward()
                        del logits, loss
                    del out
                    if embed is None:
                        model.zero_grad(set_to_none=True)
                    col.check_finite()
                    _report(progress, i + 1, total)
            return col.factors()
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _require_grad(module: nn.Module, inputs: Any, output: Any) -> Any:
    if isinstance(output, Tensor) and not output.requires_grad and output.is_floating_point():
        output.requires_grad_(True)
    return output


def _unpack(batch: Tensor | Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        ids, attn = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, attn = batch, None
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
        attn = attn.unsqueeze(0) if attn is not None else None
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [b, L], got {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.long)
    if attn is not None:
        if attn.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attn.shape)} != input_ids shape {tuple(ids.shape)}")
        attn = attn.to(device)
    return ids, attn


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")
    return logits


def _summed_lm_loss(logits: Tensor, ids: Tensor, attn: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Summed next-token cross-entropy; labels from ``ids`` or, with a generator, sampled from the model."""
    pred = logits[:, :-1].float()
    vocab = pred.shape[-1]
    if generator is None:
        labels = ids[:, 1:]
    else:
        with torch.no_grad():
            probs = torch.softmax(pred.detach(), dim=-1).reshape(-1, vocab)
            labels = torch.multinomial(probs, 1, generator=generator).view(pred.shape[:-1])
    if attn is not None:
        valid = attn[:, 1:].bool() & attn[:, :-1].bool()
        labels = labels.masked_fill(~valid, _IGNORE)
    return F.cross_entropy(pred.reshape(-1, vocab), labels.reshape(-1), ignore_index=_IGNORE, reduction="sum")


def _report(progress: Any, i: int, total: int | None) -> None:
    if progress is None:
        return
    update = getattr(progress, "update", None)
    if callable(update):
        update(1)
    else:
        progress(i, total)


# -- post-processing ------------------------------------------------------------------------------------


def cast_factors(factors: Mapping[str, KFactors], dtype: torch.dtype) -> dict[str, KFactors]:
    """``factors`` in ``dtype``; tensors shared between linears (one input, one A) stay shared."""
    cast: dict[int, Tensor] = {}

    def one(t: Tensor) -> Tensor:
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype)
        return cast[id(t)]

    return {n: KFactors(A=one(f.A), G=one(f.G), n_tokens=f.n_tokens) for n, f in factors.items()}


def equalize_norms(factors: Mapping[str, KFactors]) -> dict[str, KFactors]:
    """Rescale each layer's G and A to equal Frobenius norm, keeping ``G ⊗ A`` unchanged.

    ``G`` of a summed token loss and ``A`` of activations can differ by many orders of magnitude;
    balancing them keeps both well inside fp32 range. Costs and updates computed with relative
    damping are unchanged by it. Each :class:`KFactors` is updated in place with new tensors (the
    old tensors are not modified, so a shared A stays valid for others but is no longer shared);
    layers with an all-zero or non-finite factor are left as they are. Returns ``factors`` as a dict.
    """
    for f in factors.values():
        na = float(torch.linalg.matrix_norm(f.A))
        ng = float(torch.linalg.matrix_norm(f.G))
        if na > 0 and ng > 0 and math.isfinite(na) and math.isfinite(ng):
            s = math.sqrt(na / ng)
            f.A, f.G = f.A / s, f.G * s
    return dict(factors)
