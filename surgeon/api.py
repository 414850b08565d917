"""``surgeon.prune``: one call, in place, for every method."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from . import determinism, distributed
from . import methods  # noqa: F401  (registers the methods)
from .adapters import adapter_for
from .config import MethodConfig
from .data import as_token_windows
from .methods.base import Context, get_method, host_peak_gb
from .memory import auto_batch_size
from .memory import check as check_memory
from .report import Report, versions

__all__ = ["check_activations", "check_reachable", "default_device", "prune", "validate"]

logger = logging.getLogger("surgeon")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module_record(i: int, name: str, lin: nn.Linear) -> dict[str, Any]:
    """The report's record of linear ``name`` of layer ``i`` before pruning."""
    return {"layer": i, "type": name.split(f".{i}.", 1)[1], "params_before": lin.weight.numel()}


def _module_records(adapter: Any) -> dict[str, dict[str, Any]]:
    return {name: _module_record(i, name, lin)
            for i in range(len(adapter.layers)) for name, lin in adapter.layer_linears(i).items()}


def validate(model: nn.Module, config: MethodConfig, calibration: Any, *,
             resume_state: dict[str, Any] | None = None) -> tuple[Any, torch.Tensor]:
    """Check everything that can be checked before a weight is touched; returns (adapter, windows).

    Raises ``ValueError`` (``TypeError`` for wrong kinds of arguments) naming what is wrong: an unknown
    method or unsupported architecture (with the supported ones), a model with no prunable linears or with
    NaN/Inf parameters, empty, too short or out-of-vocabulary calibration data, an N:M pattern that does
    not divide a layer, or a structured target that cannot be reached while every group keeps one structure.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config (e.g. surgeon.SurgeonConfig), got {type(config).__name__}")
    get_method(config.method)
    adapter = adapter_for(model)
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name} contains NaN or Inf; the model is broken before pruning")
    windows = as_token_windows(calibration)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{int(windows.min())}, {int(windows.max())}]")
    if config.structure_kind == "nm":
        n, m = config.nm
        for name, lin in adapter.linears().items():
            if lin.in_features % m:
                raise ValueError(f"{config.structure}: M={m} does not divide the {lin.in_features} inputs of {name}")
    if config.structure_kind == "structured":
        check_reachable(adapter, config.sparsity, params0=(resume_state or {}).get("params0"))
    return adapter, windows


def check_reachable(adapter: Any, sparsity: float, *, params0: int | None = None) -> None:
    """Refuse a structured target that would need some group (a layer's heads or MLP channels) to lose all
    of its structures. ``params0`` is the prunable size before pruning began (for a resumed run)."""
    current = adapter.prunable_params()
    params0 = int(params0) if params0 else current
    groups = adapter.structure_groups()
    removable = sum((g.count - 1) * g.params_per_structure for g in groups)
    need = sparsity * params0 - (params0 - current)
    if need > removable:
        most = (params0 - current + removable) / params0
        raise ValueError(
            f"structured sparsity {sparsity:g} cannot be reached: keeping at least one attention head group and "
            f"one MLP channel in each of the {len(adapter.layers)} layers allows at most {most:.4f} "
            f"(remaining size {1 - most:.4f})")


@torch.no_grad()
def check_activations(model: nn.Module, adapter: Any, ids: torch.Tensor) -> None:
    """One forward pass over ``ids`` that names the first prunable linear (in execution order) whose input
    or output is NaN/Inf, so that a broken model or an overflowing dtype is refused before pruning starts
    rather than discovered as NaN costs or masks halfway through."""
    bad: list[str] = []

    def hook(name: str):
        def check(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if bad:
                return
            if not bool(torch.isfinite(args[0]).all()):
                bad.append(f"the input of {name}")
            elif not bool(torch.isfinite(out).all()):
                bad.append(f"the output of {name}")
        return check

    handles = [lin.register_forward_hook(hook(name)) for name, lin in adapter.linears().items()]
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        logits = model(input_ids=ids.to(device), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not bad and not bool(torch.isfinite(logits).all()):
        bad.append("the logits")
    if bad:
        raise ValueError(f"NaN or Inf activations in {bad[0]} on the first calibration window; "
                         "the model overflows in this dtype or is broken (nothing was pruned)")


def prune(
    model: nn.Module,
    config: MethodConfig,
    calibration: Any,
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    autocast: str | torch.dtype | None = "auto",
    progress: bool = True,
    on_shot: Any = None,
    checkpoint: Any = None,
    resume_state: dict[str, Any] | None = None,
    deterministic: bool = False,
) -> Report:
    """Prune ``model`` in place with the method that ``config`` names, and return the run's report.

    ``calibration`` is token ids: a LongTensor [N, L], a list of equal-length id sequences, or a
    ``datasets.Dataset`` with ``input_ids`` (see :func:`surgeon.data.calibration_windows` to make them
    from text). The model is moved to ``device`` (a GPU when there is one). ``autocast="auto"`` runs the
    calibration passes in bf16 on GPUs while weights, statistics and updates stay in fp32.
    ``batch_size`` windows go through each calibration pass; None takes the largest that the memory
    plan fits on the device (:func:`surgeon.memory.auto_batch_size`: at most 8 on a GPU, 4 on a CPU),
    logged and recorded in ``report.extra["batch_size"]``. It changes speed and memory, not the result
    (beyond rounding): statistics are sums over tokens.
    Structured pruning leaves a physically smaller model; the others leave exact zeros.
    ``deterministic=True`` runs inside :func:`surgeon.determinism.deterministic` (math attention,
    deterministic algorithms, no TF32): the same call gives the same weights, at some cost in speed.
    """
    with determinism.deterministic(deterministic):
        return _prune(model, config, calibration, device=device, batch_size=batch_size, autocast=autocast,
                      progress=progress, on_shot=on_shot, checkpoint=checkpoint, resume_state=resume_state)


def _prune(model: nn.Module, config: MethodConfig, calibration: Any, *, device: torch.device | str | None,
           batch_size: int, autocast: str | torch.dtype | None, progress: bool, on_shot: Any, checkpoint: Any,
           resume_state: dict[str, Any] | None) -> Report:
    adapter, windows = validate(model, config, calibration, resume_state=resume_state)
    _, fn = get_method(config.method)
    if resume_state and resume_state.get("_config") not in (None, config.to_dict()):
        raise ValueError("resume_state was written by a run with another config; resume with the same config")
    device = torch.device(device) if device is not None else default_device()
    if isinstance(autocast, str):
        if autocast == "auto":
            autocast = torch.bfloat16 if device.type == "cuda" else None
        elif autocast in ("none", "float32", "fp32"):
            autocast = None
        else:
            autocast = getattr(torch, autocast)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (automatic), got {batch_size!r}")
    model.to(device)
    if batch_size is None:
        chosen = auto_batch_size(model, config, tuple(windows.shape), device=device, autocast_dtype=autocast)
        batch_size = chosen["value"]
        if distributed.is_main():
            logger.info("calibration batch size %d (automatic: %s estimate %.2f GiB of %s GiB usable, cap %d)",
                        batch_size, chosen["basis"], chosen["estimated_peak_gb"], chosen["usable_gb"], chosen["cap"])
    else:
        chosen = {"value": batch_size, "auto": False}
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
    report.extra["batch_size"] = chosen
    if determinism.active():
        report.extra["deterministic"] = True
    if resume_state and resume_state.get("_report"):
        _continue_report(report, resume_state["_report"])
        prev_kept = resume_state["_report"].get("extra", {}).get("kept_structures", {})
        adapter.kept = {k: torch.tensor(v, dtype=torch.long) for k, v in prev_kept.items()}
    ctx = Context(model=model, adapter=adapter, config=config, calibration=windows, device=device, report=report,
                  batch_size=batch_size, autocast_dtype=autocast, progress=progress, on_shot=on_shot,
                  checkpoint=checkpoint, resume_state=resume_state)
    check_memory(ctx)  # logs the memory plan; refuses a run that cannot fit the device
    with ctx.autocast():
        check_activations(model, adapter, windows[:1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if checkpoint is not None and hasattr(checkpoint, "bind"):
        checkpoint.bind(ctx)
    torch.manual_seed(config.seed)
    if resume_state and resume_state.get("_rng") is not None:
        from .checkpoint import set_rng_state

        set_rng_state(resume_state["_rng"])
    t0 = time.perf_counter()
    fn(ctx)
    for name, lin in adapter.linears().items():
        if not bool(torch.isfinite(lin.weight).all()):
            raise ValueError(f"pruning left NaN or Inf in {name}.weight; the pruned model is unusable")
    report.wall_s = time.perf_counter() - t0 + float((resume_state or {}).get("_elapsed_s", 0.0))
    if device.type == "cuda":
        report.peak_gpu_gb = max([p["peak_gpu_gb"] for p in report.phases.values()] + [torch.cuda.max_memory_allocated(device) / 2**30])
    report.peak_host_gb = host_peak_gb()
    finalize_report(report, adapter, structured=config.structure_kind == "structured")
    return report


def _continue_report(report: Report, prev: dict[str, Any]) -> None:
    """Carry over what a resumed run's report knew before the interruption: sizes before pruning began
    (the resumed model may already be smaller), phase timings and extra records."""
    report.params_before = int(prev.get("params_before", report.params_before))
    report.model = prev.get("model") or report.model  # not the checkpoint folder the model was reloaded from
    for name, rec in prev.get("modules", {}).items():
        report.modules.setdefault(name, {}).update({k: v for k, v in rec.items() if k not in ("params_after", "shape")})
    report.phases = {k: dict(v) for k, v in prev.get("phases", {}).items()}
    report.extra = {**prev.get("extra", {}), **report.extra, "resumed": prev.get("extra", {}).get("resumed", 0) + 1}


def finalize_report(report: Report, adapter: Any, *, structured: bool) -> None:
    """Fill in what remains of each module (its weights' count, or non-zeros when masked)."""
    for i in range(len(adapter.layers)):
        for name, lin in adapter.layer_linears(i).items():
            rec = report.modules.setdefault(name, _module_record(i, name, lin))
            w = lin.weight
            rec["params_after"] = w.numel() if structured else int(torch.count_nonzero(w))
            rec["shape"] = list(w.shape)
    report.params_after = sum(r["params_after"] for r in report.modules.values())
    if adapter.kept:  # which heads/channels survived, by their index in the model as given
        report.extra["kept_structures"] = {k: v.tolist() for k, v in sorted(adapter.kept.items())}
