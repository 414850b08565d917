"""Run 2:4-pruned linears on the sparse tensor cores of NVIDIA GPUs (compute capability 8.0 or newer).

A model pruned to 2:4 is saved as dense matrices with exact zeros, which run at dense speed. On Ampere
and newer GPUs torch can store such a matrix as a :class:`torch.sparse.SparseSemiStructuredTensor`
(half the values plus 2-bit indices) whose products use the sparse tensor cores. :func:`to_semi_structured`
swaps the weights of the prunable linears for that format, in place, for inference.

Everything that can be checked without a GPU is checked first, before the model is touched: the dtype,
that every weight really is 2:4 (the compression keeps two values per group of four and would silently
drop a third one), and the shapes the kernels accept. Then the GPU is checked, then the weights are
converted, so a refused call leaves the model as it was.

The shape limits are those torch enforces in ``torch/sparse/semi_structured.py``: the weight's rows and
columns must each be a positive multiple of a per-backend, per-dtype block — (16, 16) for fp16/bf16
with cuSPARSELt (the default), (32, 64) with CUTLASS (when
``torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS`` is set). They are read from torch at run time,
so other torch versions apply their own. The activations need no particular shape: torch pads them.

Speed: the gain shows on large products (prefill, large batches); a single-token decode step is bound
by memory bandwidth and Python dispatch, and may well be slower. ``benchmarks/bench_sparse24.py``
measures both. A converted model is for inference only: it cannot be trained or saved with
:func:`surgeon.io.save_pruned` (save the dense model with zeros and convert after loading).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
    to_sparse_semi_structured,
)

from .adapters import adapter_for

__all__ = ["DTYPES", "NEEDS_GPU", "check_2to4", "convertible_linears", "kernel_block", "to_semi_structured"]

#: Weight dtypes converted here (int8 and fp8 need scales that a plain linear does not have).
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

NEEDS_GPU = "semi-structured sparsity needs an NVIDIA GPU with compute capability 8.0 or newer"

# Used only if a torch version lacks the per-backend table: the stricter (CUTLASS) fp16/bf16 limits.
_FALLBACK_BLOCK = (32, 64)


def check_2to4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs (last dim) of every row has at most 2 non-zeros.

    A last dimension that 4 does not divide is not 2:4 (False). Works on any device and dtype; -0.0
    counts as zero. A weight already in semi-structured form is 2:4 by construction.
    """
    if isinstance(weight, SparseSemiStructuredTensor):
        return True
    if weight.dim() == 0 or weight.shape[-1] % 4:
        return False
    if weight.numel() == 0:
        return True
    groups = weight.detach().reshape(-1, 4)
    return bool(((groups != 0).sum(dim=1) <= 2).all())


def _backend_class() -> type[SparseSemiStructuredTensor]:
    """The subclass ``to_sparse_semi_structured`` will build, following torch's own switch."""
    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def kernel_block(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) that a weight's shape must be a positive multiple of, for the backend torch will use."""
    table = getattr(_backend_class(), "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    cfg = table.get(dtype)
    if cfg is None:
        return _FALLBACK_BLOCK
    return int(cfg.sparse_min_rows), int(cfg.sparse_min_cols)


def _target_dtype(linears: dict[str, nn.Linear], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype} is not supported by the semi-structured kernels here; "
                             "use torch.float16 or torch.bfloat16")
        return dtype
    dtypes = {m.weight.dtype for m in linears.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise ValueError(f"the linear weights are {found}; the semi-structured kernels take float16 or bfloat16: "
                         "pass dtype=torch.float16 (or torch.bfloat16) to cast the model, or cast it first")
    return next(iter(dtypes))


def _shape_error(shape: torch.Size, dtype: torch.dtype) -> str | None:
    rows, cols = kernel_block(dtype)
    m, n = shape
    if m < rows or m % rows or n < cols or n % cols:
        backend = getattr(_backend_class(), "BACKEND", "torch")
        return (f"shape {tuple(shape)} is refused by the {backend} kernels for {dtype}: rows must be a positive "
                f"multiple of {rows} and columns of {cols}")
    return None


def convertible_linears(model: nn.Module, *, dtype: torch.dtype | None = None, min_features: int = 0,
                        strict: bool = True) -> list[str]:
    """Names of the prunable linears :func:`to_semi_structured` would convert; needs no GPU.

    Linears with fewer than ``min_features`` inputs or outputs stay dense (small products rarely gain),
    and so do those already converted. With ``strict`` a remaining linear that is not 2:4, or whose shape
    the kernels refuse, is a ValueError naming it; otherwise it is left dense.
    """
    linears = adapter_for(model).linears()
    dense = {n: m for n, m in linears.items() if not isinstance(m.weight, SparseSemiStructuredTensor)}
    dtype = _target_dtype(dense or linears, dtype)
    names = []
    for name, lin in linears.items():
        w = lin.weight
        if isinstance(w, SparseSemiStructuredTensor) or min(w.shape) < min_features:
            continue
        if not check_2to4(w):
            if strict:
                raise ValueError(f"{name}: weight {tuple(w.shape)} is not 2:4 (some group of 4 consecutive inputs "
                                 "has more than 2 non-zeros); prune with structure='2:4' first, or pass strict=False "
                                 "to leave such linears dense")
            continue
        err = _shape_error(w.shape, dtype)
        if err is not None:
            if strict:
                raise ValueError(f"{name}: {err}; pass min_features to leave small linears dense, or strict=False")
            continue
        names.append(name)
    return names


def _require_gpu(devices: set[torch.device]) -> None:
    """RuntimeError unless every device is an NVIDIA GPU of compute capability >= 8.0 with a usable backend."""
    if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        raise RuntimeError(f"{NEEDS_GPU} (no CUDA device is available)")
    for device in sorted(devices, key=str):
        gpu = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(gpu)
        if (major, minor) < (8, 0):
            raise RuntimeError(f"{NEEDS_GPU}; {torch.cuda.get_device_name(gpu)} has {major}.{minor}")
        if device.type != "cuda":
            raise RuntimeError(f"the linear weights are on {device}: move the model to the GPU first "
                               "(model.to('cuda'))")
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if (not SparseSemiStructuredTensor._FORCE_CUTLASS and cusparselt is not None
            and not cusparselt.is_available()):
        raise RuntimeError("this torch build has no cuSPARSELt; set "
                           "torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True to use the CUTLASS kernels")


def to_semi_structured(model: nn.Module, *, dtype: torch.dtype | None = None, min_features: int = 0,
                       strict: bool = True) -> list[str]:
    """Convert, in place, the 2:4 prunable linears of ``model`` to semi-structured sparse weights.

    ``dtype`` (float16 or bfloat16) casts the whole model before converting, since activations must
    match the weights' dtype; by default the weights must already be one of them. ``min_features`` and
    ``strict`` are as in :func:`convertible_linears`. The model must be on a GPU of compute capability
    8.0 or newer. Every check runs before anything changes, and with nothing to convert nothing
    changes. Returns the names of the linears converted; their weights are frozen (``requires_grad=False``).
    """
    names = convertible_linears(model, dtype=dtype, min_features=min_features, strict=strict)
    linears = adapter_for(model).linears()
    if not names:
        return []
    _require_gpu({linears[n].weight.device for n in names})
    if dtype is not None and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype)
    for name in names:
        lin = linears[name]
        w = lin.weight.detach().contiguous()
        lin.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
    return names
