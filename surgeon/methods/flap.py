"""FLAP (An et al., 2023): structured, retraining-free pruning from input-feature fluctuation.

One pass over the calibration data collects, for every output projection (o_proj / down_proj, OPT's
out_proj / fc2), the mean and variance of each input channel. A channel that barely fluctuates carries
little information beyond its mean, so it can be removed and its mean folded into the projection's bias
(bias compensation). Channels are scored, grouped into the adapter's structures (attention head groups,
MLP channels), standardised per (layer, module kind), and a structure search decides how much each layer
loses. Pruning is one-shot from the dense model's statistics, as in the paper, and the model ends up
physically smaller.

Score of input channel ``j`` of an output projection ``W`` (R×C), from its calibration inputs X (N×C):

- ``wifv`` (default): ``Var_n(X_nj) · ‖W_:j‖₂²`` — the output variance the channel contributes.
- ``ifv``: ``Var_n(X_nj)``.
- ``wifn``: ``mean_i |W_ij| · ‖X_:j‖₂ / √N`` — Wanda's ``|W_ij|·‖X_j‖`` averaged over output rows, with
  the root-mean-square input instead of the norm so that it does not depend on the number of tokens.

Variances are population variances (divide by N). A structure owns ``block`` input columns of its output
projection: a Llama KV group's ``queries_per_kv · head_dim`` columns of o_proj, an OPT head's
``head_dim`` columns, one column of down_proj / fc2 for an MLP channel. Scores are standardised within
each (layer, module kind), z = (S − mean) / std, so that layers and kinds meet in one pool; where the
standardisation happens is the ``standardize`` option (identical for MLP channels, whose block is 1):

- ``"channels"`` (default): standardise the channel scores over the layer's output-projection columns,
  then a structure's z is the mean of its channels' z (the authors' public code does this). The
  statistics behind each z are the projection's hundreds of columns, which stays meaningful when a
  layer has only a few KV groups (SmolLM2: three).
- ``"structures"``: sum each structure's channel scores, then standardise over the layer's structures.
  With few structures per layer this is nearly a fixed pattern (three values always standardise to
  about ±1 and 0), so every layer's cheapest head group looks equally cheap.

Within one group both give the same order (a structure's channel sum and its mean z are increasing
affine functions of each other), so they differ only in how layers and kinds are weighed in the pool.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapters import StructureGroup
from ..config import MethodConfig, option
from ..sequential import LayerStep, Moments, for_each_layer
from .base import Context, register

__all__ = [
    "FlapConfig",
    "bias_shift",
    "channel_scores",
    "prefix_counts",
    "search_structures",
    "standardize",
    "structure_scores",
    "structure_z",
]

METRICS = ("wifv", "ifv", "wifn")
SEARCHES = ("ul-um", "al-mm", "al-am")
STANDARDIZE = ("channels", "structures")

# Config switches that give a family's linears biases, per module kind. A fresh model built from the
# switched config must have exactly the pruned model's parameter names (checked before any weight moves);
# families missing here (e.g. Mistral, Qwen2: no switch for o_proj / down_proj biases) cannot store a
# compensated model that plain ``transformers`` reloads, so bias compensation is refused for them.
_BIAS_SWITCHES: dict[str, dict[str, str]] = {
    "llama": {"attn": "attention_bias", "mlp": "mlp_bias"},
    "qwen3": {"attn": "attention_bias"},
    "opt": {"attn": "enable_bias", "mlp": "enable_bias"},
}


@dataclass(frozen=True)
class FlapConfig(MethodConfig):
    """FLAP (An et al., 2023): fluctuation-based structured pruning with bias compensation.

    ``sparsity`` is the fraction of prunable linear weights removed ("structured 80%" is 0.2).
    """

    method: ClassVar[str] = "flap"
    structures: ClassVar[tuple[str, ...]] = ("structured",)

    structure: str = option("structured", "FLAP removes whole structures only: 'structured'")
    metric: str = option("wifv", "channel score: 'wifv' (variance × squared weight norm), 'ifv' (variance), "
                                 "'wifn' (mean |W| × input RMS)")
    search: str = option("al-am", "allocation: 'ul-um' (uniform), 'al-mm' (adaptive layers, attention/MLP "
                                  "split by parameter share), 'al-am' (one global pool)")
    standardize: str = option("channels", "standardise channel scores then average per structure ('channels'), "
                                          "or standardise summed structure scores ('structures')")
    bias_compensation: bool = option(True, "fold the mean of removed input channels into the output bias")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.standardize not in STANDARDIZE:
            raise ValueError(f"standardize must be one of {STANDARDIZE}, got {self.standardize!r}")


# -- scores ----------------------------------------------------------------------------------------
def channel_scores(metric: str, weight: torch.Tensor, var: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """Score of each input channel of ``weight`` (R×C) from the population variance and the mean square
    E[x²] = ‖X_:j‖² / N of its inputs (fp64, on the host)."""
    var = var.detach().to(weight.device, torch.float64)
    if metric == "ifv":
        s = var
    elif metric == "wifv":
        s = var * weight.detach().float().square().sum(0).to(torch.float64)
    elif metric == "wifn":
        ms = mean_square.detach().to(weight.device, torch.float64)
        s = weight.detach().float().abs().mean(0).to(torch.float64) * ms.clamp_min(0).sqrt()
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return s.cpu()


def structure_scores(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sum the channel scores of each structure (``block`` consecutive channels)."""
    return scores.reshape(-1, block).sum(1)


def structure_z(scores: torch.Tensor, block: int, where: str = "channels") -> torch.Tensor:
    """Standardised structure scores from channel scores (see ``standardize`` in the module docstring)."""
    if where == "channels":
        return standardize(scores).reshape(-1, block).mean(1)
    if where == "structures":
        return standardize(structure_scores(scores, block))
    raise ValueError(f"standardize must be one of {STANDARDIZE}, got {where!r}")


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """z = (S − mean) / std within one (layer, module kind); sample std, all zeros when it vanishes.

    Standardising makes head groups and MLP channels of different layers comparable in one pool.
    """
    s = scores.to(torch.float64)
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(s)
    return (s - s.mean()) / std


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, removed_cols: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] · X̄[removed]``: what the removed inputs contributed on average (fp64)."""
    cols = removed_cols.to(weight.device)
    w = weight.detach().index_select(1, cols).to(torch.float64)
    return w @ mean.to(weight.device, torch.float64).index_select(0, cols)


# -- search -----------------------------------------------------------------------------------------
def _prefix_counts_torch(arrays: Sequence[torch.Tensor], weights: Sequence[int], budget: int) -> list[int]:
    """Reference rule by one stable sort of the concatenation (its order breaks ties by array, position)."""
    if not arrays:
        return []
    vals = torch.cat([a.detach().reshape(-1).to(torch.float32).cpu() for a in arrays])
    sizes = torch.tensor([a.numel() for a in arrays])
    owner = torch.repeat_interleave(torch.arange(len(arrays)), sizes)
    w = torch.as_tensor(list(weights), dtype=torch.long)[owner]
    order = torch.sort(vals, stable=True).indices
    cum = torch.cumsum(w[order], 0)
    taken = int(torch.searchsorted(cum, torch.tensor(budget, dtype=torch.long), right=True))
    return torch.bincount(owner[order[:taken]], minlength=len(arrays)).tolist()


def prefix_counts(arrays: Sequence[torch.Tensor], weights: Sequence[int], budget: int) -> list[int]:
    """How many of each array's smallest entries the longest affordable prefix of the global order takes.

    The global order is by value (float32), ties by array order then position; entry ``j`` of array
    ``i`` costs ``weights[i]``. The prefix stops at the first entry that would exceed ``budget``, even
    when a later, lighter entry would fit. This is the rule of ``surgeon._backend.global_threshold``,
    which does the work (native, without concatenating) when available.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    host = [a.detach().reshape(-1).to(torch.float32).cpu().contiguous() for a in arrays]
    try:
        from .. import _backend
    except ImportError:
        return _prefix_counts_torch(host, weights, budget)
    _, counts = _backend.global_threshold(host, int(budget), weights=[int(w) for w in weights])
    return [int(c) for c in counts]


def _removal_order(z: torch.Tensor) -> torch.Tensor:
    """Structures of one group, cheapest first (ties by index)."""
    return torch.sort(z, stable=True).indices


def _guarded(z: torch.Tensor) -> torch.Tensor:
    """The group's scores with its last structure in removal order set to +inf (never removed)."""
    g = z.clone()
    if g.numel():
        g[_removal_order(g)[-1]] = math.inf
    return g


def _pool(zs: Sequence[torch.Tensor], weights: Sequence[int], budget: int) -> list[int]:
    """Longest affordable prefix over the pooled groups, keeping one structure per group."""
    guarded = [_guarded(z) for z in zs]
    finite = sum((z.numel() - 1) * int(w) for z, w in zip(zs, weights) if z.numel())
    return prefix_counts(guarded, weights, min(budget, finite))  # the +inf guards are never reached


def search_structures(
    zs: Sequence[torch.Tensor],
    weights: Sequence[int],
    kinds: Sequence[str],
    budget: int,
    search: str,
    sparsity: float,
) -> list[torch.Tensor]:
    """Which structures of each group to remove (sorted indices), spending at most ``budget`` params.

    ``zs[g]`` are group ``g``'s standardised scores (compared in float32, ties by group order, then
    index), ``weights[g]`` its parameters per structure, ``kinds[g]`` its module kind. Every group keeps
    at least one structure. Rules:

    - ``al-am``: one pool of all groups; the longest prefix of the order (score ascending, ties by
      group order then index) whose parameter total fits the budget.
    - ``al-mm``: each module kind gets ``budget`` × its share of the parameters and is cut on its own
      pool across layers; kinds with larger structures go first and pass their leftover on, so the
      last (finest) kind absorbs the rounding.
    - ``ul-um``: every group removes ``⌊sparsity · count⌋`` of its cheapest structures; the leftover
      budget then adds one more structure to groups, cheapest next structure first, while it fits
      (uniform to within one structure, and the total lands within one structure of the budget).
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if not (len(zs) == len(weights) == len(kinds)):
        raise ValueError("zs, weights and kinds must have one entry per group")
    zs = [z.detach().reshape(-1).to(torch.float32).cpu() for z in zs]  # one precision for every order
    for z in zs:
        if not torch.isfinite(z).all():
            raise ValueError("FLAP scores must be finite (calibration activations overflowed?)")
    counts = [z.numel() for z in zs]
    if search == "al-am":
        taken = _pool(zs, weights, budget)
    elif search == "al-mm":
        taken = [0] * len(zs)
        total = sum(c * int(w) for c, w in zip(counts, weights))
        largest = {k: max(int(w) for w, kk in zip(weights, kinds) if kk == k) for k in set(kinds)}
        order = sorted(largest, key=lambda k: (-largest[k], k))
        spent = 0
        for pos, k in enumerate(order):
            idx = [g for g, kk in enumerate(kinds) if kk == k]
            share = sum(counts[g] * int(weights[g]) for g in idx)
            b = budget - spent if pos == len(order) - 1 else (budget * share) // max(total, 1)
            b = min(b, budget - spent)
            sub = _pool([zs[g] for g in idx], [weights[g] for g in idx], b)
            for g, t in zip(idx, sub):
                taken[g] = t
            spent += sum(t * int(weights[g]) for g, t in zip(idx, sub))
    else:
        taken = [min(math.floor(round(sparsity * c, 9)), max(c - 1, 0)) for c in counts]
        spent = sum(t * int(w) for t, w in zip(taken, weights))
        for g in reversed(range(len(zs))):  # rounding guard: never start above the budget
            while spent > budget and taken[g] > 0:
                taken[g] -= 1
                spent -= int(weights[g])
        cand = [(float(zs[g][_removal_order(zs[g])[taken[g]]]), g)
                for g in range(len(zs)) if taken[g] < counts[g] - 1]
        for _, g in sorted(cand):
            if spent + int(weights[g]) <= budget:
                taken[g] += 1
                spent += int(weights[g])
    return [_removal_order(z)[:t].sort().values for z, t in zip(zs, taken)]


# -- bias compensation: keeping the pruned model reloadable -------------------------------------------
def _zero_bias_plan(model: nn.Module, kinds: set[str], outputs: dict[str, str]) -> tuple[dict[str, bool], list[str]]:
    """Config switches to turn on and linears that need a zero bias so that output projections of
    ``kinds`` can carry a bias and a model built from the config has the same parameter names.

    ``outputs`` maps output-projection names to their kind. Raises ValueError when this family cannot
    express the biases in its config.
    """
    model_type = getattr(model.config, "model_type", "")
    need = {k for name, k in outputs.items() if k in kinds and model.get_submodule(name).bias is None}
    if not need:
        return {}, []
    switches = _BIAS_SWITCHES.get(model_type, {})
    missing = sorted(k for k in need if k not in switches or not hasattr(model.config, switches[k]))
    if missing:
        raise ValueError(f"bias_compensation needs a bias on the {'/'.join(missing)} output projections, which "
                         f"{model_type!r} configs cannot express (the saved model would not reload); "
                         "use FlapConfig(bias_compensation=False)")
    flags = {switches[k]: True for k in need}
    cfg = copy.deepcopy(model.config)
    for attr, v in flags.items():
        setattr(cfg, attr, v)
    with torch.device("meta"):
        fresh = type(model)(cfg)
    names = {n for n, _ in fresh.named_parameters()}
    ours = {n for n, _ in model.named_parameters()}
    added, unexpected = [], sorted(ours - names)
    for n in sorted(names - ours):
        mod_name, _, leaf = n.rpartition(".")
        mod = model.get_submodule(mod_name) if leaf == "bias" else None
        if isinstance(mod, nn.Linear) and mod.bias is None:
            added.append(mod_name)
        else:
            unexpected.append(n)
    if unexpected:
        raise ValueError(f"turning on {sorted(flags)} for {model_type!r} changes parameters other than linear "
                         f"biases ({', '.join(unexpected[:4])}); use FlapConfig(bias_compensation=False)")
    return flags, added


def _add_zero_biases(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight
        lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)


# -- the method -------------------------------------------------------------------------------------
def _output_part(group: StructureGroup):
    """The group's output projection: the one linear whose input columns the structures are."""
    cols = [p for p in group.parts if p.axis == "col"]
    if len(cols) != 1:
        raise ValueError(f"{group.name}: FLAP needs exactly one output projection, found {len(cols)}")
    return cols[0]


def _collect_stats(ctx: Context, groups: Sequence[StructureGroup]) -> dict[str, Moments]:
    """Input moments of every output projection, block by block on the *dense* model's activations.

    The blocks are left untouched during the pass (FLAP prunes in one shot from dense statistics, and
    the global search needs every layer's scores before it can cut), so this is the paper's procedure;
    the layer-sequential pipeline only bounds memory to one block at a time.
    """
    per_layer: dict[int, list[str]] = {}
    for g in groups:
        per_layer.setdefault(g.layer, []).append(_output_part(g).linear)
    stats: dict[str, Moments] = {}

    def step(s: LayerStep) -> None:
        stats.update(s.collect(Moments.of, names=per_layer.get(s.index, [])))

    for_each_layer(ctx, step, desc="flap statistics")
    return stats


@register(FlapConfig)
def flap(ctx: Context) -> None:
    """Score, search, compensate and shrink; see the module docstring for the maths."""
    cfg: FlapConfig = ctx.config  # type: ignore[assignment]
    adapter = ctx.adapter
    groups = adapter.structure_groups()
    outputs = {_output_part(g).linear: g.kind for g in groups}
    if cfg.bias_compensation:  # refuse up front, before a single weight changes
        _zero_bias_plan(ctx.model, {g.kind for g in groups}, outputs)

    stats = _collect_stats(ctx, groups)  # phases "capture", "statistics", "forward"

    with ctx.phase("scores"):
        zs = []
        for g in groups:
            part = _output_part(g)
            st = stats[part.linear]
            s = channel_scores(cfg.metric, adapter.module(part.linear).weight, st.variance(), st.sq / max(st.n, 1))
            zs.append(structure_z(s, part.block, cfg.standardize))

    with ctx.phase("search"):
        total = adapter.prunable_params()
        budget = math.floor(round(cfg.sparsity * total, 6))
        removed = search_structures(zs, [g.params_per_structure for g in groups], [g.kind for g in groups],
                                    budget, cfg.search, cfg.sparsity)

    with ctx.phase("compress"):
        flags: dict[str, bool] = {}
        added: list[str] = []
        if cfg.bias_compensation:
            kinds = {g.kind for g, r in zip(groups, removed) if r.numel()}
            flags, added = _zero_bias_plan(ctx.model, kinds, outputs)
            shifts = []
            for g, r in zip(groups, removed):
                if r.numel():
                    part = _output_part(g)
                    cols = part.indices(r)
                    w = adapter.module(part.linear).weight
                    shifts.append((part.linear, bias_shift(w, stats[part.linear].mean, cols)))
            _add_zero_biases(ctx.model, added)
            for attr, v in flags.items():
                setattr(ctx.model.config, attr, v)
            with torch.no_grad():
                for name, shift in shifts:
                    b = adapter.module(name).bias
                    b.add_(shift.to(b.device, b.dtype))
        for g, r in zip(groups, removed):
            if r.numel():
                keep = torch.ones(g.count, dtype=torch.bool)
                keep[r] = False
                adapter.keep_structures(g, keep.nonzero().flatten())

    spent = sum(int(r.numel()) * g.params_per_structure for g, r in zip(groups, removed))
    ctx.report.extra["flap"] = {
        "metric": cfg.metric,
        "search": cfg.search,
        "standardize": cfg.standardize,
        "statistics": "layer-sequential, dense blocks (input moments of the output projections)",
        "prunable_params": total,
        "budget_params": budget,
        "removed_params": spent,
        "groups": {g.name: {"kind": g.kind, "layer": g.layer, "count": g.count, "kept": g.count - int(r.numel()),
                            "params_per_structure": g.params_per_structure}
                   for g, r in zip(groups, removed)},
        "bias_compensation": {"enabled": cfg.bias_compensation, "config_switches": sorted(flags),
                              "zero_biases_added": len(added)},
    }
    ctx.log.info("flap: removed %d of %d prunable params (budget %d, %s, %s)", spent, total, budget,
                 cfg.metric, cfg.search)

