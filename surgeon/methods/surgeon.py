"""LLM Surgeon: multi-shot pruning with Kronecker-factored curvature and a global threshold.

Each shot re-estimates the K-FAC factors (G, A) of every prunable linear on the current model, prices
every structure (or weight) with the closed-form OBS cost, removes the globally cheapest until the shot's
target, and updates the remaining weights to compensate. Structured shots shrink the model physically
right away, so later shots are cheaper and the curvature is always that of the model being pruned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import _backend, allocation, determinism, distributed
from ..adapters.base import Part, StructureGroup
from ..config import MethodConfig, option
from ..curvature import KFactors, cast_factors, equalize_norms, estimate_kfac
from ..linalg import damped, damped_inverse
from ..lowrank import dense_teacher, lowrank_update
from ..masks import row_count_mask
from ..memory import activation_checkpointing
from ..obs import masked as mobs
from ..obs import structured as sobs
from ..obs import unstructured as uobs
from ..selection import select_count
from .admm import admm_nm_mask, refit_to_dense
from .base import Context, register

__all__ = ["SurgeonConfig", "KOBDConfig", "LOBDConfig"]


@dataclass(frozen=True)
class SurgeonConfig(MethodConfig):
    """LLM Surgeon (van der Ouderaa et al., 2023). See the README for how the defaults were chosen."""

    method: ClassVar[str] = "llm-surgeon"

    shots: int = option(8, "number of shots; curvature is re-estimated before each")
    schedule: str = option("linear", "how the target moves over the shots: linear, cubic or exponential")
    fisher: str | None = option(None, "'empirical' (true next-token labels) or 'sampled' (labels from the model); "
                                      "default: sampled structured and N:M, empirical unstructured")
    curvature: str = option("kfac", "'kfac' (G and A) or 'activations' (A only, G = I)")
    update: bool = option(True, "apply the correlated OBS update to the remaining weights")
    damp_g: float | None = option(None, "relative damping of G (default: 0.01 structured, 0.1 otherwise)")
    damp_a: float | None = option(None, "relative damping of A (default: 0.1 structured, 0.03 N:M, 0.01 unstructured)")
    damp_mode: str = option("mean", "how damping scales: 'mean' adds damp·mean(diag)·I, 'diagonal' adds "
                                    "damp·diag (each input and output damped relative to its own scale)",
                            choices=("mean", "diagonal"))
    damp_mode_a: str | None = option(None, "how A's damping scales, when it differs from G's (default: 'diagonal' "
                                           "N:M, damp_mode otherwise); 'diagonal' damps each input by its own "
                                           "variance, as ADMM damps its Gram matrix",
                                     choices=(None, "mean", "diagonal"))
    correlation: str = option("full", "unstructured/N:M update: 'full', 'row' or 'none'")
    max_correlate: int = option(2000, "most weights solved jointly in one 'full' update chunk")
    equalize: bool = option(True, "rescale G and A to equal Frobenius norm (G ⊗ A unchanged)")
    offload_factors: bool = option(False, "accumulate the K-FAC factors in host memory")
    accumulate: str = option("float32", "dtype of the K-FAC sums: 'float64' sums exactly whatever the order, so a "
                                        "data-parallel run gets the factors of one process (twice the factor memory)")
    lowrank_rank: int = option(0, "rank of the low-rank update fine-tuned between shots (0 = off)")
    lowrank_steps: int = option(20, "optimizer steps of each low-rank update")
    lowrank_lr: float = option(1e-4, "learning rate of the low-rank update (Adam)")
    nm_allocation: str = option("layer", "N:M shots before the last: 'layer' moves every linear toward its pattern at "
                                         "the same pace; 'row' every row of it (the last shot then removes a shot's "
                                         "share of each row, not all of a dear row at once); 'global' lets one "
                                         "threshold across layers choose")
    align: int = option(64, "structured: keep each layer's MLP width a multiple of this (multiples of 64 keep bf16 "
                            "GPU matrix kernels on their fast paths; small layers use a smaller power-of-two share of "
                            "it; 1 = exact size)")
    # -- structured pruning: what a structure is, how it is priced, compensated and allocated --------------
    align_when: str = option("shot", "structured: 'end' rounds each layer's MLP width to the multiple in the last shot; "
                                    "'shot' removes MLP channels in chunks of that many in every shot",
                             choices=("end", "shot"))
    structured_update: str = option("output", "structured OBS update: 'all' updates the weights around every part of a "
                                           "removed structure (gate/up/q/k/v rows through G^-1, down/o columns through "
                                           "A^-1); 'output' only the down/o columns (the least-squares optimum of that "
                                           "linear) and slices the input-side rows away",
                                    choices=("all", "output"))
    structured_cost: str = option("output", "price of a structure: 'sum' of every part's OBS cost, or 'output' the cost "
                                         "of its down/o columns alone (the loss of silencing it)",
                                  choices=("sum", "output"))
    structured_rank: str = option("per_param", "global order of structures: 'cost' (loss increase) or 'per_param' (loss "
                                          "per freed parameter, a knapsack greedy)", choices=("cost", "per_param"))
    attention: str = option("kv_group", "attention structure: 'kv_group' (a KV head and its queries), 'query' (one "
                                        "query head of every KV group; KV heads stay) or 'both'",
                            choices=("kv_group", "query", "both"))
    allocation: str = option("global", "structured: 'global' lets the costs choose every layer's share; 'uniform' "
                                       "removes the same numbers from every layer (one shape, a stock config)",
                             choices=("global", "uniform"))
    # -- unstructured / N:M updates, curvature precision, low-rank fit (issue 16; the ablation compares them) --
    constrain_removed: bool = option(False, "unstructured/N:M 'obs' update: solve with the weights removed in earlier "
                                            "shots held at zero (else the update moves them, they are re-zeroed after "
                                            "it and the compensation they carried is lost)")
    solver: str = option("cg", "unstructured/N:M update once the shot's mask is chosen (with correlation='full'; "
                               "'row'/'none' always use the OBS closed forms): 'obs' (closed-form OBS at the "
                                "correlation level) or 'cg' (the exact masked optimum in G ⊗ A by conjugate gradient)")
    reference: str = option("current", "unstructured/N:M update: the weights it reconstructs, 'current' (before the "
                                       "shot) or 'dense' (before pruning; keeps a copy of the prunable weights)")
    cg_iterations: int = option(200, "solver='cg': most conjugate-gradient iterations per linear and shot")
    cg_tol: float = option(1e-5, "solver='cg': relative residual at which conjugate gradient stops")
    curvature_fp32: bool = option(False, "K-FAC passes in fp32, no bf16 autocast and no TF32 (bf16 passes leave "
                                         "about 8% relative error in early layers' G)")
    lowrank_target: str = option("labels", "low-rank fit: 'labels' (the calibration text's next tokens) or 'dense' "
                                           "(KL to the dense model's predictions; keeps a copy of the model)")
    lowrank_holdout: float = option(0.0, "fraction of calibration windows held out of the low-rank fit; their loss "
                                         "picks the step that is kept (0 = off)")
    lowrank_eval_every: int = option(5, "low-rank steps between evaluations of the held-out loss")
    lowrank_masked: bool = option(False, "train the low-rank adapters through the sparsity mask (what they learn "
                                         "is what is kept)")
    lowrank_final: bool = option(False, "fit a low-rank update after the last shot too")
    # 'admm' since c7f20a2's GPU run: better on the calibration windows (32.21 vs 32.72) and on both test texts
    # (benchmarks/results/ablation-mask.md beside the llm-surgeon 2:4 row of smollm2.md)
    nm_final_mask: str = option("admm", "N:M, last shot: what completes every group, 'kfac' (the K-FAC costs) or 'admm' "
                                        "(gradual ADMM's selection on the layer's A: Wanda's scores re-selected from the "
                                        "ADMM iterate; earlier shots' zeros stay); the update after it is the same",
                                choices=("kfac", "admm"))
    nm_admm_shots: int = option(1, "nm_final_mask='admm': how many of the last shots choose their removals by ADMM's "
                                   "selection (1 = the last alone; each earlier one removes its share of every row, "
                                   "at most M - N of a group); the others use the K-FAC costs")
    # off by default: on SmolLM2 2:4 it refilled the mask worse on the calibration windows (34.61 vs 32.63) and on
    # WikiText-2, and the same out of domain (benchmarks/results/ablation-refit.md)
    refit: str = option("none", "unstructured/N:M, after the last shot: 'admm' refits every linear on the mask the "
                                "shots chose to its dense outputs, block by block (ADMM's layer-wise least squares; "
                                "keeps a copy of the prunable weights), 'none' keeps the shots' weights",
                        choices=("none", "admm"))
    refit_iterations: int = option(50, "refit='admm': ADMM iterations per linear")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")
        checks = {"schedule": ("linear", "cubic", "exponential"), "fisher": (None, "empirical", "sampled"),
                  "curvature": ("kfac", "activations"), "correlation": ("full", "row", "none"),
                  "accumulate": ("float32", "float64"), "nm_allocation": ("layer", "row", "global"),
                  "align_when": ("end", "shot"), "structured_update": ("all", "output"),
                  "structured_cost": ("sum", "output"), "structured_rank": ("cost", "per_param"),
                  "attention": ("kv_group", "query", "both"), "allocation": ("global", "uniform"), "damp_mode": ("mean", "diagonal"),
                  "damp_mode_a": (None, "mean", "diagonal")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_correlate < 1:
            raise ValueError(f"max_correlate must be >= 1, got {self.max_correlate}")
        if (self.damp_a is not None and self.damp_a < 0) or (self.damp_g is not None and self.damp_g < 0):
            raise ValueError("damping must be >= 0")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")
        if self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0, got {self.lowrank_rank}")
        self._check_update_options()

    def _check_update_options(self) -> None:
        checks = {"solver": ("obs", "cg"), "reference": ("current", "dense"), "lowrank_target": ("labels", "dense"),
                  "nm_final_mask": ("kfac", "admm"), "refit": ("none", "admm")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.cg_iterations < 1 or self.cg_tol < 0:
            raise ValueError(f"need cg_iterations >= 1 and cg_tol >= 0, got {self.cg_iterations} and {self.cg_tol}")
        if not 0.0 <= self.lowrank_holdout < 1.0:
            raise ValueError(f"lowrank_holdout must be in [0, 1), got {self.lowrank_holdout}")
        if self.lowrank_eval_every < 1:
            raise ValueError(f"lowrank_eval_every must be >= 1, got {self.lowrank_eval_every}")
        if self.nm_admm_shots < 1:
            raise ValueError(f"nm_admm_shots must be >= 1, got {self.nm_admm_shots}")
        if self.refit_iterations < 1:
            raise ValueError(f"refit_iterations must be >= 1, got {self.refit_iterations}")
        if self.refit == "admm" and self.structure_kind == "structured":
            raise ValueError("refit='admm' refits an unstructured or N:M mask; structured pruning removes whole "
                             "structures and compensates them in every shot (use refit='none')")

    @property
    def g_damping(self) -> float:
        if self.damp_g is not None:
            return self.damp_g
        return 0.01 if self.structure_kind == "structured" else 0.1

    @property
    def fisher_labels(self) -> str:
        """Structured costs and updates fitted to the calibration text's own next tokens follow that text:
        labels drawn from the model (the true Fisher) gave lower perplexity on the calibration windows and
        on both test texts (benchmarks/results/ablation-damping.md, row D3). N:M likewise: lower perplexity on
        the calibration windows at 2:4 (benchmarks/results/ablation-24c.md, row C4)."""
        if self.fisher is not None:
            return self.fisher
        return "empirical" if self.structure_kind == "unstructured" else "sampled"

    # N:M: how A is damped by default, (mode, relative damping). 'diagonal' 0.03 since 2363e93's GPU runs: on
    # the calibration text a tie with 'mean' 0.01 at the full protocol (calibration and held-out windows) and
    # better on the CPU's deterministic held-out windows (benchmarks/results/select-24.md, repeat-24e.md,
    # directions-cpu.md); K-OBD and L-OBD keep the form they were measured with.
    nm_a_damping: ClassVar[tuple[str, float]] = ("diagonal", 0.03)

    @property
    def a_damp_mode(self) -> str:
        """The mean form is set by a few outlier inputs (LLM activations have them) and so damps every other
        input far more, relative to its own variance, than those; the diagonal form damps each input by its
        own scale, which makes the pruning indifferent to how each input happens to be scaled."""
        if self.damp_mode_a is not None:
            return self.damp_mode_a
        return self.nm_a_damping[0] if self.structure_kind == "nm" else self.damp_mode

    @property
    def a_damping(self) -> float:
        """Structured removals are compensated by regressing a removed channel on the kept ones under A: a
        damping of 0.1 shrinks that regression toward no update, which predicts held-out windows and other
        text better than 0.01 (benchmarks/results/ablation-damping.md)."""
        if self.damp_a is not None:
            return self.damp_a
        if self.structure_kind == "nm":
            return self.nm_a_damping[1]
        return 0.1 if self.structure_kind == "structured" else 0.01


@dataclass(frozen=True)
class KOBDConfig(SurgeonConfig):
    """K-OBD: LLM Surgeon's K-FAC costs with no correlated update (the paper's baseline)."""

    method: ClassVar[str] = "k-obd"
    update: bool = option(False, "apply the correlated OBS update (off for K-OBD)")
    correlation: str = option("none", "unstructured/N:M update (none for K-OBD)")
    solver: str = option("obs", "unstructured/N:M update solver (closed-form OBS for K-OBD)")
    nm_final_mask: str = option("kfac", "N:M, last shot: the K-FAC costs complete every group (the paper's K-OBD)",
                                choices=("kfac", "admm"))
    nm_a_damping: ClassVar[tuple[str, float]] = ("mean", 0.01)


@dataclass(frozen=True)
class LOBDConfig(SurgeonConfig):
    """L-OBD: activations-only curvature (G = I), no correlated update (the paper's baseline)."""

    method: ClassVar[str] = "l-obd"
    curvature: str = option("activations", "'activations' (G = I) for L-OBD")
    update: bool = option(False, "apply the correlated OBS update (off for L-OBD)")
    correlation: str = option("none", "unstructured/N:M update (none for L-OBD)")
    solver: str = option("obs", "unstructured/N:M update solver (closed-form OBS for L-OBD)")
    nm_final_mask: str = option("kfac", "N:M, last shot: the costs complete every group (the paper's L-OBD)",
                                choices=("kfac", "admm"))
    nm_a_damping: ClassVar[tuple[str, float]] = ("mean", 0.01)


# ---------------------------------------------------------------------------------------------------
def _factors(ctx: Context, names: list[str], shot: int) -> dict[str, KFactors]:
    cfg: SurgeonConfig = ctx.config  # type: ignore[assignment]
    modules = {n: ctx.adapter.module(n) for n in names}
    if distributed.debug():
        distributed.assert_same(f"weights before shot {shot + 1}", [m.weight for m in modules.values()])
    batches, n_batches = distributed.local_batches(ctx)  # this rank's windows (all in one process)
    bar = ctx.tqdm(total=n_batches, desc=f"shot {shot + 1}/{cfg.shots}: curvature", leave=False)
    try:
        with activation_checkpointing(ctx.model, ctx.adapter.layers):
            factors = estimate_kfac(
                ctx.model, modules, batches, fisher=cfg.fisher_labels, seed=distributed.rank_seed(cfg.seed + shot),
                autocast_dtype=None if cfg.curvature_fp32 else ctx.autocast_dtype, device=ctx.device,
                offload=cfg.offload_factors, gradients=cfg.curvature == "kfac",
                tf32=ctx.device.type == "cuda" and not cfg.curvature_fp32 and not determinism.active(),
                dtype=getattr(torch, cfg.accumulate), progress=lambda i, n: bar.update(1),
            )
    finally:
        bar.close()
    factors = distributed.reduce_factors(factors)
    if cfg.accumulate != "float32":  # summed exactly; the rest of the shot works in fp32 as usual
        factors = cast_factors(factors, torch.float32)
    if cfg.equalize:
        equalize_norms(factors)
    return factors


class _Inverses:
    """Damped inverses of the factors, made on demand one linear at a time.

    Keeping every layer's inverses for the whole shot would cost as much memory as the factors
    themselves (tens of GiB for a 7B model); recomputing them in the update phase costs one Cholesky
    per pruned linear. The last inverse of A is kept, since q/k/v (gate/up) read one input.
    """

    def __init__(self, factors: dict[str, KFactors], cfg: SurgeonConfig):
        self.factors, self.cfg = factors, cfg
        self._last: tuple[int, torch.Tensor] | None = None

    def G(self, name: str, device: torch.device) -> torch.Tensor:
        return damped_inverse(self.factors[name].G.to(device), self.cfg.g_damping, name=f"{name} G",
                              mode=self.cfg.damp_mode)

    def A(self, name: str, device: torch.device) -> torch.Tensor:
        A = self.factors[name].A
        if self._last is None or self._last[0] != id(A) or self._last[1].device != device:
            self._last = (id(A), damped_inverse(A.to(device), self.cfg.a_damping, name=f"{name} A",
                                                       mode=self.cfg.a_damp_mode))
        return self._last[1]


def _shot_structured(ctx: Context, shot: int, target_sparsity: float, params0: int, final: bool = False) -> dict[str, Any]:
    cfg: SurgeonConfig = ctx.config  # type: ignore[assignment]
    adapter = ctx.adapter
    groups = adapter.structure_groups(attention=cfg.attention)  # type: ignore[arg-type]

    def priced(g: StructureGroup) -> tuple[Part, ...]:
        return g.output_parts if cfg.structured_cost == "output" else g.parts

    def compensates(axis: str) -> bool:
        return cfg.update and (cfg.structured_update == "all" or axis == "col")

    # only the linears that are priced or updated need curvature ('output' alone: o_proj and down_proj)
    names = sorted({p.linear for g in groups for p in g.parts if p in priced(g) or compensates(p.axis)})
    with ctx.phase("curvature"):
        factors = _factors(ctx, names, shot)
    inv = _Inverses(factors, cfg)
    with ctx.phase("costs"):
        costs = []
        for g in groups:
            c = None
            for p in priced(g):
                W = adapter.module(p.linear).weight.detach().float()
                f = factors[p.linear]
                dev = W.device
                sets = p.sets(g.count).to(dev)
                if p.axis == "row":
                    pc = sobs.row_costs(W, f.A.to(dev), inv.G(p.linear, dev), sets=sets)
                else:
                    pc = sobs.col_costs(W, f.G.to(dev), inv.A(p.linear, dev), sets=sets)
                c = pc if c is None else c + pc
            costs.append(c)
    current = adapter.prunable_params()
    budget = max(0, int(target_sparsity * params0) - (params0 - current))
    with ctx.phase("threshold"):
        picked = allocation.plan(groups, costs, budget, lambda picks: adapter.freed_params(list(zip(groups, picks))),
                                 rank=cfg.structured_rank, allocation=cfg.allocation, align=cfg.align,
                                 align_every=cfg.align_when == "shot", final=final)
    removals = [(g, rm) for g, rm in zip(groups, picked) if rm.numel()]
    est = sum(float(c[rm.to(c.device)].sum()) for (g, rm), c in zip(zip(groups, picked), costs) if rm.numel())
    with ctx.phase("update"):
        # one joint solve per linear over everything it loses (KV groups and query slots share q/o)
        for (name, axis), lost in adapter.dropped(removals).items():
            if not compensates(axis):
                continue
            lin = adapter.module(name)
            W = lin.weight.detach().float()
            idx = lost.nonzero().flatten().to(W.device)
            if axis == "row":
                W_new, _ = sobs.remove_rows(W, inv.G(name, W.device), idx)
            else:
                W_new, _ = sobs.remove_cols(W, inv.A(name, W.device), idx)
            lin.weight.data.copy_(W_new.to(lin.weight.dtype))
        adapter.remove_structures(removals)
    removed = {g.name: int(r.numel()) for g, r in removals}
    return {"estimated_loss": est, "removed_structures": int(sum(removed.values())), "removed_by_group": removed}


def _update_weights(cfg: SurgeonConfig, name: str, W: torch.Tensor, remove: torch.Tensor, keep: torch.Tensor,
                    factors: KFactors, inv: _Inverses, dense: torch.Tensor | None) -> tuple[torch.Tensor, float, Any]:
    """New weights of one linear with ``remove`` zeroed, the loss estimate, and the CG solution (or None).

    With ``reference='dense'`` the update reconstructs the weights before pruning (under this shot's
    curvature): the OBS path starts from them with every zero of the mask as a constraint, CG targets
    them; the estimate is then the total loss relative to them, not this shot's increase.
    """
    dev = W.device
    ref = None if dense is None else dense.to(dev, torch.float32)
    if cfg.update and cfg.solver == "cg" and cfg.correlation == "full":
        sol = mobs.masked_optimum(W, keep & ~remove, damped(factors.G.to(dev), cfg.g_damping, cfg.damp_mode),
                                  damped(factors.A.to(dev), cfg.a_damping, cfg.a_damp_mode), inv.G(name, dev), inv.A(name, dev),
                                  reference=ref, iterations=cfg.cg_iterations, tol=cfg.cg_tol)
        return sol.weight, sol.loss, sol
    whole = cfg.update and (cfg.constrain_removed or ref is not None)  # every zero of the mask is solved for
    start = ref if cfg.update and ref is not None else W
    W_new, cost = uobs.prune_weights(start, remove | ~keep if whole else remove, inv.G(name, dev), inv.A(name, dev),
                                     correlation=cfg.correlation if cfg.update else "none",
                                     max_correlate=cfg.max_correlate, keep_mask=None if whole else keep)
    return W_new, cost, None


def _shot_unstructured(ctx: Context, shot: int, target_sparsity: float, final: bool,
                       masks: dict[str, torch.Tensor], dense: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """One unstructured / N:M shot; ``masks`` (True = kept) are updated in place.

    Explicit masks, not ``W != 0``: dequantised checkpoints hold exact zeros that are live weights.
    ``dense`` holds the weights before pruning (``reference='dense'``).
    """
    cfg: SurgeonConfig = ctx.config  # type: ignore[assignment]
    adapter = ctx.adapter
    linears = adapter.linears()
    names = list(linears)
    with ctx.phase("curvature"):
        factors = _factors(ctx, names, shot)
    nm = cfg.structure_kind == "nm"
    n, m = cfg.nm if nm else (0, 0)
    # ADMM's selection chooses this shot's removals (in the last shot: completes the groups), not the costs
    admm_mask = nm and cfg.nm_final_mask == "admm" and shot >= cfg.shots - cfg.nm_admm_shots
    inv = _Inverses(factors, cfg)
    with ctx.phase("costs"):
        costs = []
        for name in ([] if admm_mask else names):
            W = linears[name].weight.detach().float()
            c = uobs.weight_costs(W, inv.G(name, W.device).diagonal(), inv.A(name, W.device).diagonal())
            c = uobs.masked_costs(c, masks[name])
            c = uobs.nm_candidates(c, masks[name], n, m) if nm and not final else c
            # with offloaded factors the per-weight costs (one float per weight) wait in host memory
            costs.append(c.cpu() if cfg.offload_factors else c)
    total = sum(c.numel() for c in costs)
    with ctx.phase("threshold"):
        if admm_mask:
            share = None if final else target_sparsity  # of every row, this shot (N:M fixes cfg.sparsity = 1 - N/M)
            removes = []
            for name in names:
                W = linears[name].weight.detach().float()
                keep = masks[name].to(W.device)
                removes.append(keep & ~admm_nm_mask(W, factors[name].A.to(W.device), n, m, keep=keep,
                                                    sparsity=share))
        elif nm and final:  # complete every group to exactly M - N removed
            removes = [~uobs.nm_select(c, n, m, keep_mask=masks[name].to(c.device)) for name, c in zip(names, costs)]
        else:
            frac = target_sparsity / cfg.sparsity
            if nm and cfg.nm_allocation == "row":
                # every row's share: earlier zeros rank first (-inf), weights the pattern forbids last (+inf)
                removes = [~row_count_mask(c, int(frac * (c.shape[1] * (m - n) // m))) for c in costs]
            else:
                if nm and cfg.nm_allocation == "layer":
                    # each linear's share of its final M - N per group; a global threshold lets cheap layers
                    # reach the pattern early and leaves the others to the last shot, in one large step
                    picked = [select_count([c], int(frac * (c.numel() * (m - n) // m)))[0] for c in costs]
                else:
                    k = int(_backend.cumulative_counts(total, target_sparsity, 1, "linear")[-1])
                    picked = select_count(costs, k)
                removes = []
                for c, pos in zip(costs, picked):
                    mask = torch.zeros(c.numel(), dtype=torch.bool, device=c.device)
                    mask[pos.to(c.device)] = True
                    removes.append(mask.view_as(c))
    est = 0.0
    solves = []
    with ctx.phase("update"):
        for name, rm in zip(names, removes):
            lin = linears[name]
            W = lin.weight.detach().float()
            rm = rm.to(W.device) & masks[name]
            if not bool(rm.any()):
                continue
            W_new, cost, sol = _update_weights(cfg, name, W, rm, masks[name], factors[name], inv,
                                               None if dense is None else dense[name])
            est += float(cost)
            if sol is not None:
                solves.append(sol)
            lin.weight.data.copy_(W_new.to(lin.weight.dtype))
            masks[name] &= ~rm
    rec: dict[str, Any] = {"estimated_loss": est}
    if solves:
        rec["cg"] = {"mean_iterations": sum(s.iterations for s in solves) / len(solves),
                     "max_iterations": max(s.iterations for s in solves),
                     "max_residual": max(s.residual for s in solves)}
    return rec


def _dense_copies(ctx: Context, cfg: SurgeonConfig) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """What ``reference='dense'`` and ``refit='admm'`` (the prunable weights) and ``lowrank_target='dense'`` (a
    frozen copy of the model, at the calibration passes' precision) keep of the model before pruning.

    A resumed run finds the weights in its checkpoint (``_tensors``); the frozen model is not kept there.
    """
    weights = cfg.structure_kind != "structured" and (
        (cfg.update and cfg.reference == "dense") or cfg.refit != "none")
    model = cfg.lowrank_rank > 0 and cfg.lowrank_target == "dense"
    if model and ctx.resume_state:
        raise ValueError("lowrank_target='dense' needs the model before pruning, which a resumed run no longer has; "
                         "run from the start")
    dense = None
    where = torch.device("cpu") if cfg.offload_factors else None
    if weights and ctx.resume_state:
        dense = (ctx.resume_state.get("_tensors") or {}).get("dense")
        if dense is None:
            raise ValueError("reference='dense' and refit='admm' need the weights before pruning, and this checkpoint "
                             "does not hold them; run from the start")
        linears = ctx.adapter.linears()
        dense = {name: t.to(where or linears[name].weight.device) for name, t in dense.items()}
    elif weights:
        dense = {name: lin.weight.detach().to(where or lin.weight.device, copy=True)
                 for name, lin in ctx.adapter.linears().items()}
    return dense, dense_teacher(ctx.model, ctx.autocast_dtype) if model else None


@register(SurgeonConfig)
@register(KOBDConfig)
@register(LOBDConfig)
def run(ctx: Context) -> None:
    cfg: SurgeonConfig = ctx.config  # type: ignore[assignment]
    structured = cfg.structure_kind == "structured"
    targets = _backend.schedule(cfg.sparsity, cfg.shots, cfg.schedule)
    # A resumed structured model is already smaller: targets stay relative to the size before shot 1.
    params0 = int((ctx.resume_state or {}).get("params0") or ctx.adapter.prunable_params())
    # A resumed run's earlier removals are its zeros (exact zeros of the original weights count as removed).
    masks = {} if structured else {
        name: (lin.weight != 0) if ctx.resume_state else torch.ones_like(lin.weight, dtype=torch.bool)
        for name, lin in ctx.adapter.linears().items()}
    if ctx.resume_state and cfg.structure_kind == "nm":
        n, m = cfg.nm
        for keep in masks.values():  # zeros beyond M - N in a group are live weights that happen to be 0
            groups = keep.view(keep.shape[0], -1, m)
            groups |= (~groups).cumsum(-1) > (m - n)
    dense, teacher = _dense_copies(ctx, cfg)
    kept = None if dense is None else {"dense": dense}  # one object: the checkpoints write it once
    start = 0
    if ctx.resume_state:
        start = int(ctx.resume_state.get("next_shot", 0))
        ctx.report.shots.extend(ctx.resume_state.get("shots", []))
    for shot in ctx.tqdm(range(start, cfg.shots), desc=f"{cfg.method} {cfg.structure}", initial=start, total=cfg.shots):
        t0 = time.perf_counter()
        phases0 = {k: v["wall_s"] for k, v in ctx.report.phases.items()}
        target = float(targets[shot])
        if structured:
            rec = _shot_structured(ctx, shot, target, params0, final=shot == cfg.shots - 1)
        else:
            rec = _shot_unstructured(ctx, shot, target, final=shot == cfg.shots - 1, masks=masks, dense=dense)
        if cfg.lowrank_rank > 0 and (shot < cfg.shots - 1 or cfg.lowrank_final):
            with ctx.phase("lowrank"):
                info = lowrank_update(ctx, rank=cfg.lowrank_rank, steps=cfg.lowrank_steps, lr=cfg.lowrank_lr,
                                      masks=masks or None, target=cfg.lowrank_target, teacher=teacher,
                                      holdout=cfg.lowrank_holdout, eval_every=cfg.lowrank_eval_every,
                                      masked=cfg.lowrank_masked)
            rec["lowrank_loss"] = info.pop("loss")
            if info:
                rec["lowrank"] = info
        current = ctx.adapter.prunable_params() if structured else sum(int(k.sum()) for k in masks.values())
        rec.update(shot=shot + 1, target_sparsity=target, achieved_sparsity=1 - current / params0,
                   wall_s=time.perf_counter() - t0,
                   phases_s={k: v["wall_s"] - phases0.get(k, 0.0) for k, v in ctx.report.phases.items()})
        ctx.report.shots.append(rec)
        ctx.log.info("shot %d/%d: sparsity %.4f (target %.4f), est. loss %.4g, %.1fs", shot + 1, cfg.shots,
                     rec["achieved_sparsity"], target, rec["estimated_loss"], rec["wall_s"])
        if ctx.on_shot is not None:
            ctx.on_shot(rec)
        if ctx.checkpoint is not None:
            state = {"next_shot": shot + 1, "shots": ctx.report.shots, "params0": params0}
            ctx.checkpoint("shot", {**state, "_tensors": kept} if kept is not None else state)
    if cfg.refit == "admm":
        ctx.report.extra["refit"] = {"method": "admm", "iterations": cfg.refit_iterations,
                                     **refit_to_dense(ctx, dense, masks, iterations=cfg.refit_iterations)}
        ctx.log.info("refit to the dense outputs: summed relative output error %.4g -> %.4g",
                     ctx.report.extra["refit"]["error_before"], ctx.report.extra["refit"]["error_after"])
