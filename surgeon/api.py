"""``surgeon.prune``: one call, in place, for every method."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from . import methods  # noqa: F401  (registers the methods)
from .adapters import adapter_for
from .config import MethodConfig
from .data import as_token_windows
from .methods.base import Context, get_method, host_peak_gb
from .report import Report, versions

__all__ = ["prune", "default_device", "validate"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module_records(adapter: Any) -> dict[str, dict[str, Any]]:
    recs = {}
    for i in range(len(adapter.layers)):
        for name, lin in adapter.layer_linears(i).items():
            recs[name] = {"layer": i, "type": name.split(f".{i}.", 1)[1], "params_before": lin.weight.numel()}
    return recs


def validate(model: nn.Module, config: MethodConfig, calibration: Any) -> tuple[Any, torch.Tensor]:
    """Check everything that can be checked before a weight is touched; returns (adapter, windows)."""
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config (e.g. surgeon.SurgeonConfig), got {type(config).__name__}")
    get_method(config.method)
    adapter = adapter_for(model)
    windows = as_token_windows(calibration)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{int(windows.min())}, {int(windows.max())}]")
    if config.structure_kind == "nm":
        n, m = config.nm
        for name, lin in adapter.linears().items():
            if lin.in_features % m:
                raise ValueError(f"{config.structure}: M={m} does not divide the {lin.in_features} inputs of {name}")
    return adapter, windows


def prune(
    model: nn.Module,
    config: MethodConfig,
    calibration: Any,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    autocast: str | torch.dtype | None = "auto",
    progress: bool = True,
    on_shot: Any = None,
    checkpoint: Any = None,
    resume_state: dict[str, Any] | None = None,
) -> Report:
    """Prune ``model`` in place with the method that ``config`` names, and return the run's report.

    ``calibration`` is token ids: a LongTensor [N, L], a list of equal-length id sequences, or a
    ``datasets.Dataset`` with ``input_ids`` (see :func:`surgeon.data.calibration_windows` to make them
    from text). The model is moved to ``device`` (a GPU when there is one). ``autocast="auto"`` runs the
    calibration passes in bf16 on GPUs while weights, statistics and updates stay in fp32.
    Structured pruning leaves a physically smaller model; the others leave exact zeros.
    """
    adapter, windows = validate(model, config, calibration)
    _, fn = get_method(config.method)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(autocast, str):
        if autocast == "auto":
            autocast = torch.bfloat16 if device.type == "cuda" else None
        elif autocast in ("none", "float32", "fp32"):
            autocast = None
        else:
            autocast = getattr(torch, autocast)
    model.to(device)
    report = Report(
        method=config.method,
        config=config.to_dict(),
        model=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        family=adapter.family,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        seed=config.seed,
        calibration={"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": int(windows.numel())},
        modules=_module_records(adapter),
        versions=versions(),
    )
    report.params_before = sum(r["params_before"] for r in report.modules.values())
    ctx = Context(model=model, adapter=adapter, config=config, calibration=windows, device=device, report=report,
                  batch_size=batch_size, autocast_dtype=autocast, progress=progress, on_shot=on_shot,
                  checkpoint=checkpoint, resume_state=resume_state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    fn(ctx)
    report.wall_s = time.perf_counter() - t0
    if device.type == "cuda":
        report.peak_gpu_gb = max([p["peak_gpu_gb"] for p in report.phases.values()] + [torch.cuda.max_memory_allocated(device) / 2**30])
    report.peak_host_gb = host_peak_gb()
    finalize_report(report, adapter, structured=config.structure_kind == "structured")
    return report


def finalize_report(report: Report, adapter: Any, *, structured: bool) -> None:
    """Fill in what remains of each module (its weights' count, or non-zeros when masked)."""
    for i in range(len(adapter.layers)):
        for name, lin in adapter.layer_linears(i).items():
            rec = report.modules.setdefault(name, {"layer": i, "type": name.split(f".{i}.", 1)[1], "params_before": lin.weight.numel()})
            w = lin.weight
            rec["params_after"] = w.numel() if structured else int(torch.count_nonzero(w))
            rec["shape"] = list(w.shape)
    report.params_after = sum(r["params_after"] for r in report.modules.values())
