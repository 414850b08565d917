"""Data-parallel calibration with ``torch.distributed``: every rank sees a slice of the windows.

Launched with ``torchrun`` (NCCL on GPUs, gloo on CPUs), each rank runs the same pruning loop on the
same model. Only the calibration passes are split: rank r accumulates its K-FAC factors over its
contiguous slice of the windows, and :func:`reduce_factors` turns the per-rank averages back into sums,
adds them over ranks and divides by the global token count, so every rank ends up with the factors a
single process would have computed (up to the order of floating-point additions, which
``accumulate="float64"`` takes out: its sums are exact before the final rounding to fp32). From there
every rank prices the same structures with the same numbers and the global threshold picks the same
masks everywhere; :func:`assert_same` checks that cheaply when ``SURGEON_DEBUG_DISTRIBUTED=1``.

Inversions can also be spread: :func:`assign` balances layers over ranks (greedy longest processing
time first), ``reduce_factors(..., owners=...)`` sums each factor onto its owner only, and
:func:`spread` computes a result on its owner and broadcasts it.

Without an initialised process group (or with one rank) every function is a no-op, so the same code
runs in one process.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEBUG_ENV",
    "STAGING_BYTES",
    "active",
    "assert_same",
    "assign",
    "backend",
    "barrier",
    "debug",
    "finish",
    "init_from_env",
    "inversion_work",
    "is_main",
    "local_batches",
    "rank",
    "rank_seed",
    "reduce_factors",
    "shard",
    "shard_bounds",
    "spread",
    "world_size",
]

#: Set to 1 to check after every reduction that all ranks hold identical factors and weights.
DEBUG_ENV = "SURGEON_DEBUG_DISTRIBUTED"

#: Host tensors pass through device chunks of this size when the backend only reduces device memory
#: (NCCL), so offloaded factors never need a second full copy on the device.
STAGING_BYTES = 256 * 2**20
_STAGE_ELEMENTS = STAGING_BYTES // 4


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 and in a single process: the rank that logs and writes outputs."""
    return rank() == 0


def backend() -> str | None:
    return str(dist.get_backend()) if active() else None


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false", "False")


def init_from_env(device_type: str | None = None) -> torch.device | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) and return this rank's device.

    NCCL with GPU ``LOCAL_RANK`` when CUDA is there (and ``device_type`` is not ``"cpu"``), gloo on the
    CPU otherwise. Returns None, and does nothing, outside ``torchrun`` or when a group already exists.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device_type not in (None, "cuda", "cpu"):
        raise ValueError(f"under torchrun each rank takes its own device: use 'cuda' or 'cpu', not {device_type!r}")
    if device_type != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        kw = {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        dist.init_process_group("nccl", **kw)
    else:
        if device_type == "cuda":
            raise ValueError("device 'cuda' asked for, but CUDA is not available here")
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    barrier()  # communicators are created here rather than inside the first timed reduction
    return device


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the process group once every rank is done (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


# -- splitting the calibration data ---------------------------------------------------------------


def shard_bounds(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of rank ``r``'s contiguous share of ``n`` items; the first ``n % world``
    ranks get one more, so shares differ by at most one and depend only on ``(n, world)``."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(windows: Tensor) -> Tensor:
    """This rank's contiguous slice of the calibration windows (all of them in one process)."""
    if not active():
        return windows
    n, world = windows.shape[0], world_size()
    if n < world:
        raise ValueError(f"{n} calibration windows cannot be split over {world} ranks: every rank needs at least one")
    start, end = shard_bounds(n, world)
    return windows[start:end]


def local_batches(ctx: Any) -> tuple[Iterator[Tensor], int]:
    """This rank's calibration batches (``ctx.batch_size`` windows each, moved to ``ctx.device``) and
    their number."""
    if not active():
        return ctx.batches(), ctx.n_batches
    windows = shard(ctx.calibration)
    bs = ctx.batch_size

    def gen() -> Iterator[Tensor]:
        for s in range(0, windows.shape[0], bs):
            yield windows[s : s + bs].to(ctx.device, non_blocking=True)

    return gen(), -(-windows.shape[0] // bs)


def rank_seed(seed: int) -> int:
    """A seed for this rank's random draws (sampled Fisher labels): rank 0 keeps ``seed``, so one
    process draws as before, and other ranks draw independently of it."""
    return seed + 1_000_003 * rank()


# -- reducing K-FAC factors -------------------------------------------------------------------------


def _reduce_device(t: Tensor) -> torch.device | None:
    """Where a collective on ``t`` must run: None when in place is fine, else a staging device
    (NCCL reduces only device memory; gloo reduces CUDA tensors only for some collectives)."""
    b = backend() or ""
    if t.device.type == "cpu" and "nccl" in b and "gloo" not in b:
        return torch.device("cuda", torch.cuda.current_device())
    if t.device.type == "cuda" and "gloo" in b and "nccl" not in b:
        return torch.device("cpu")
    return None


def _collective(t: Tensor, op: Callable[[Tensor], Any]) -> None:
    """Apply an in-place collective to ``t``, through device chunks when its memory cannot take part."""
    stage = _reduce_device(t)
    if stage is None:
        op(t)
        return
    flat = t.view(-1)
    for s in range(0, flat.numel(), _STAGE_ELEMENTS):
        chunk = flat[s : s + _STAGE_ELEMENTS]
        dev = chunk.to(stage)
        op(dev)
        chunk.copy_(dev)


def _unique_tensors(factors: Mapping[str, Any]) -> list[tuple[str, str, Tensor]]:
    """``(name, 'A'|'G', tensor)`` for each distinct tensor, shared A tensors once, in name order
    (the same order on every rank)."""
    seen: set[int] = set()
    out = []
    for name in sorted(factors):
        f = factors[name]
        for kind in ("A", "G"):
            t = getattr(f, kind)
            if id(t) not in seen:
                seen.add(id(t))
                out.append((name, kind, t))
    return out


def reduce_factors(factors: dict[str, Any], *, owners: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Global K-FAC factors from per-rank ones, in place (shared A tensors stay shared).

    Each rank's factor is its own average ``S_r / n_r``; the global one is ``Σ_r S_r / Σ_r n_r``, so
    every factor is multiplied back by its rank's token count, summed over ranks and divided by the
    global count (which also replaces ``n_tokens``). With ``owners`` (factor name → rank) the sum goes
    to the owner only (``dist.reduce``) and the result holds just the factors this rank owns; without,
    every rank gets every factor (``all_reduce``). Factors on the host are reduced through device
    chunks when the backend (NCCL) needs device memory.
    """
    if not active() or not factors:
        return factors
    from .curvature import KFactors

    names = sorted(factors)
    # token counts per factor, summed over ranks in one call
    probe = factors[names[0]].A
    count_dev = _reduce_device(probe) or probe.device
    local_n = torch.tensor([float(factors[n].n_tokens) for n in names], dtype=torch.float64, device=count_dev)
    total_n = local_n.clone()
    dist.all_reduce(total_n)
    n_of = dict(zip(names, local_n.tolist()))
    total_of = dict(zip(names, total_n.tolist()))
    holders: dict[int, set[int]] = {}
    if owners is not None:
        for name in names:
            f = factors[name]
            for t in (f.A, f.G):
                holders.setdefault(id(t), set()).add(int(owners[name]))
    for name, kind, t in _unique_tensors(factors):
        # a shared A whose readers have different owners goes to every rank
        dst = None if owners is None or len(holders[id(t)]) > 1 else next(iter(holders[id(t)]))
        t.mul_(n_of[name])
        if dst is None:
            _collective(t, lambda x: dist.all_reduce(x))
        else:
            _collective(t, lambda x, o=dst: dist.reduce(x, dst=o))
        if dst is None or dst == rank():
            t.div_(total_of[name])
    out = {}
    for name in names:
        if owners is not None and int(owners[name]) != rank():
            continue
        f = factors[name]
        out[name] = KFactors(A=f.A, G=f.G, n_tokens=int(total_of[name]))
    if debug() and owners is None:
        assert_same("reduced K-FAC factors", [t for _, _, t in _unique_tensors(out)])
    return out


# -- spreading work over ranks ----------------------------------------------------------------------


def assign(work: Sequence[float], world: int | None = None) -> list[int]:
    """Rank of each item under a balanced assignment: greedy longest processing time first.

    Items are taken from the most work to the least (ties by index) and each goes to the rank with
    the least work so far (ties to the lower rank). The result depends only on ``work`` and
    ``world``, so every rank computes the same assignment; the largest load is within 4/3 of the
    best possible.
    """
    world = world_size() if world is None else int(world)
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    load = [0.0] * world
    out = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-float(work[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += float(work[i])
    return out


def inversion_work(factors: Mapping[str, Any]) -> dict[str, float]:
    """Relative cost of inverting each layer's factors (Cholesky: cubic in the size)."""
    return {name: float(f.A.shape[0]) ** 3 + float(f.G.shape[0]) ** 3 for name, f in factors.items()}


def spread(
    keys: Sequence[Hashable],
    fn: Callable[[Hashable], Tensor],
    owners: Mapping[Hashable, int],
    like: Callable[[Hashable], tuple[tuple[int, ...], torch.dtype, torch.device]],
) -> dict[Hashable, Tensor]:
    """``{key: fn(key)}`` on every rank, each computed once on its owner and broadcast.

    ``like(key)`` gives ``(shape, dtype, device)`` of the result so that the other ranks can receive
    it. In one process this is ``{key: fn(key)}``.
    """
    if not active():
        return {k: fn(k) for k in keys}
    me = rank()
    out: dict[Hashable, Tensor] = {}
    for k in keys:
        owner = int(owners[k])
        if owner == me:
            t = fn(k).contiguous()
        else:
            shape, dtype, device = like(k)
            t = torch.empty(shape, dtype=dtype, device=device)
        _collective(t, lambda x, o=owner: dist.broadcast(x, src=o))
        out[k] = t
    return out


# -- consistency checks ------------------------------------------------------------------------------


def _checksum(tensors: Sequence[Tensor]) -> Tensor:
    """Per tensor: non-zeros, sum and position-weighted sum (float64), in chunks. Equal tensors agree
    exactly; a differing mask or value is very unlikely to keep all three."""
    rows = []
    for t in tensors:
        x = t.detach().reshape(-1)
        acc = torch.zeros(3, dtype=torch.float64, device=x.device)
        for s in range(0, x.numel(), _STAGE_ELEMENTS // 4):
            c = x[s : s + _STAGE_ELEMENTS // 4].double()
            pos = torch.arange(s + 1, s + 1 + c.numel(), dtype=torch.float64, device=c.device) / max(x.numel(), 1)
            acc += torch.stack([(c != 0).sum().double(), c.sum(), (c * pos).sum()])
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def assert_same(label: str, tensors: Sequence[Tensor]) -> None:
    """Raise ``RuntimeError`` unless ``tensors`` are identical on every rank (compared by checksum).

    Costs are computed from identical factors by identical code, so the thresholds, masks and updates
    must agree; when they do not (a non-deterministic kernel, ranks on different hardware), each rank
    would prune differently and the run would be wrong without any error. One small all-reduce.
    """
    if not active():
        return
    probe = tensors[0] if tensors else torch.zeros(())
    dev = _reduce_device(probe) or probe.device
    c = _checksum(tensors).to(dev)
    lo, hi = c.clone(), c.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    diff = (hi - lo) != 0
    if bool(diff.any()):
        first = int(diff.any(1).nonzero()[0, 0])
        raise RuntimeError(f"rank {rank()}: {label} differ between ranks (first at tensor {first} of {len(tensors)})")
