"""The contract between the pruning loop and a method, and the registry of methods by name."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..config import MethodConfig
from ..report import Report

__all__ = ["Context", "METHODS", "get_method", "register"]

logger = logging.getLogger("surgeon")

MethodFn = Callable[["Context"], None]
METHODS: dict[str, tuple[type[MethodConfig], MethodFn]] = {}


def register(config_cls: type[MethodConfig]) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(ctx)`` as the method named ``config_cls.method``."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[config_cls.method] = (config_cls, fn)
        return fn

    return deco


def get_method(name: str) -> tuple[type[MethodConfig], MethodFn]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def host_peak_gb() -> float:
    """High-water mark of this process's resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class Context:
    """Everything a method needs: the model and its adapter, calibration tokens, where to compute.

    ``calibration`` stays on the host; :meth:`batches` moves one batch at a time to ``device``.
    ``autocast_dtype`` (bf16 on GPUs by default) is used for calibration passes only: weights, factors
    and updates stay in the model's dtype / fp32.
    """

    model: nn.Module
    adapter: ModelAdapter
    config: MethodConfig
    calibration: torch.Tensor
    device: torch.device
    report: Report
    batch_size: int = 1
    autocast_dtype: torch.dtype | None = None
    progress: bool = True
    checkpoint: Callable[[str, dict[str, Any]], None] | None = None
    resume_state: dict[str, Any] | None = None
    on_shot: Callable[[dict[str, Any]], None] | None = None
    log: logging.Logger = field(default=logger)

    def batches(self) -> Iterator[torch.Tensor]:
        for s in range(0, self.calibration.shape[0], self.batch_size):
            yield self.calibration[s : s + self.batch_size].to(self.device, non_blocking=True)

    @property
    def n_batches(self) -> int:
        return -(-self.calibration.shape[0] // self.batch_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def tqdm(self, iterable: Any = None, **kwargs: Any) -> Any:
        """A progress bar (tqdm) when progress is on, else the iterable itself."""
        if not self.progress:
            return iterable if iterable is not None else _NullBar()
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and record its peak GPU memory; repeated phases accumulate."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            rec = self.report.phases.setdefault(name, {"wall_s": 0.0, "peak_gpu_gb": 0.0, "peak_host_gb": 0.0, "calls": 0})
            rec["wall_s"] += time.perf_counter() - t0
            rec["calls"] += 1
            if cuda:
                rec["peak_gpu_gb"] = max(rec["peak_gpu_gb"], torch.cuda.max_memory_allocated(self.device) / 2**30)
            rec["peak_host_gb"] = max(rec["peak_host_gb"], host_peak_gb())


class _NullBar:
    def update(self, *_: Any) -> None: ...
    def set_postfix(self, *_: Any, **__: Any) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> _NullBar:
        return self
    def __exit__(self, *_: Any) -> None: ...
