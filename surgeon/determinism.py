"""A deterministic mode for benchmarks and ablations: the same run gives the same weights, bit for bit.

On a GPU the same pruning run can differ from one execution to the next: fused attention kernels and
some cuBLAS/cuDNN algorithms reduce in an order that depends on scheduling, and TF32 products round
differently from one kernel choice to the next. Differences of ~1% perplexity between variants are then
noise. :func:`deterministic` removes these sources for the duration of a block:

- attention runs on the math SDPA backend (plain matmuls and softmax, a fixed reduction order);
- ``torch.use_deterministic_algorithms(True)`` picks deterministic implementations (and, with
  ``warn_only=False``, raises on an operation that has none);
- ``CUBLAS_WORKSPACE_CONFIG`` is set, which cuBLAS needs for reproducible results (it is read when
  cuBLAS creates its handle, so enter the block before the first GPU matmul of the process);
- TF32 is off for matmuls and convolutions, and cuDNN's benchmark mode is off.

Everything is restored on exit. The price is speed (the math backend materialises attention scores;
full-precision fp32 products), measured by the benchmarks that use it. On a CPU the block changes
little: CPU kernels are deterministic for a fixed thread count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["active", "deterministic"]

_CUBLAS_WORKSPACE = ":4096:8"
_depth = 0


def active() -> bool:
    """Whether a :func:`deterministic` block is open (code that would enable TF32 checks this)."""
    return _depth > 0


@contextlib.contextmanager
def deterministic(enabled: bool = True, *, warn_only: bool = True) -> Iterator[None]:
    """Run the block deterministically (see the module docstring); ``enabled=False`` does nothing.

    ``warn_only=True`` (the default) warns instead of raising when an operation has no deterministic
    implementation, so that a long benchmark is not lost to one such operation; the warning names it.
    """
    global _depth
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    _depth += 1
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _depth -= 1
        torch.use_deterministic_algorithms(saved["algorithms"], warn_only=saved["warn_only"])
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
        torch.set_float32_matmul_precision(saved["matmul_precision"])
        if saved["cublas"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas"]
