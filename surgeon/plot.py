"""Where a run pruned: remaining fraction per layer and module type, and the per-shot loss estimates.

The allocation is an *output* of the global-threshold methods (LLM Surgeon prunes the first layers and the
MLPs hardest, the paper's Fig. 4), so it is the first thing to look at after a run. matplotlib is an
optional dependency (``pip install surgeon[plot]``); everything here works from a report alone.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import Report

__all__ = ["allocation_by_layer", "module_kind", "plot_report"]

# Display order of linear types within attention and MLP, for every supported family.
_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "fc1", "down_proj", "fc2")


def module_kind(module_type: str) -> str:
    """``"attention"`` or ``"mlp"`` for a linear type such as ``self_attn.q_proj`` or ``fc1``."""
    return "attention" if "attn" in module_type or "attention" in module_type else "mlp"


def _short(module_type: str) -> str:
    return module_type.rsplit(".", 1)[-1]


def allocation_by_layer(report: Report, by: str = "kind") -> dict[str, list[tuple[int, float]]]:
    """Remaining fraction per layer for each series: ``by="kind"`` gives ``attention``, ``mlp`` and ``all``;
    ``by="type"`` one series per linear type (``q_proj``, ``down_proj``, ...). Points are (layer, fraction)."""
    before: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    after: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for rec in report.modules.values():
        if "params_after" not in rec:
            continue
        keys = [module_kind(rec["type"]), "all"] if by == "kind" else [_short(rec["type"])]
        for k in keys:
            before[k][rec["layer"]] += rec["params_before"]
            after[k][rec["layer"]] += rec["params_after"]
    out = {}
    for k in before:
        out[k] = [(layer, after[k][layer] / before[k][layer]) for layer in sorted(before[k]) if before[k][layer]]
    return out


def _target_size(report: Report) -> float | None:
    sparsity = report.config.get("sparsity")
    return None if sparsity is None else 1.0 - float(sparsity)


def plot_report(report: Report | str | os.PathLike, path: str | os.PathLike | None = None, *, dpi: int = 120) -> Any:
    """Draw the allocation (and, for multi-shot runs, the per-shot loss) of a report.

    Left: remaining fraction by depth for attention, MLP and all prunable linears, with the target. Middle:
    the same per linear type. Right (when the report has shots): the estimated loss increase of each shot,
    and the perplexity after it when measured. Saves a PNG to ``path`` when given; returns the figure.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or surgeon[plot])") from e
    if not isinstance(report, Report):
        report = Report.load(report)
    shots = [s for s in report.shots if "estimated_loss" in s]
    panels = 3 if shots else 2
    fig = Figure(figsize=(5.2 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    target = _target_size(report)

    kinds = allocation_by_layer(report, "kind")
    styles = {"attention": ("tab:blue", "o"), "mlp": ("tab:orange", "s"), "all": ("black", None)}
    ax = axes[0]
    for k in ("attention", "mlp", "all"):
        if k in kinds:
            xs, ys = zip(*kinds[k])
            color, marker = styles[k]
            ax.plot(xs, ys, label={"all": "all linears", "mlp": "MLP"}.get(k, k), color=color, marker=marker,
                    lw=2.2 if k == "all" else 1.4, ms=4, ls="-" if k != "all" else "--")
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target size {target:.2f}")
    ax.set_title("remaining by layer")
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("remaining fraction of weights")

    types = allocation_by_layer(report, "type")
    order = sorted(types, key=lambda t: (_TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER), t))
    ax = axes[1]
    # Linears of one structure (gate/up/down rows and columns) move together under structured pruning, so
    # their lines coincide: distinct dash patterns keep every one visible.
    attn_styles = iter(zip(["#08306b", "#2171b5", "#6baed6", "#9ecae1"], ["-", "--", ":", "-."]))
    mlp_styles = iter(zip(["#7f2704", "#d94801", "#fd8d3c", "#fdd0a2"], ["-", "--", ":", "-."]))
    for t in order:
        xs, ys = zip(*types[t])
        attn = module_kind(t) == "attention" or t in ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
        color, ls = next(attn_styles if attn else mlp_styles, (None, "-"))
        ax.plot(xs, ys, label=t, marker="o" if attn else "s", ms=3.5, lw=1.4, color=color, ls=ls)
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_title("remaining by layer and linear type")
    ax.set_xlabel("layer (depth)")
    for a in axes[:2]:
        a.set_ylim(-0.02, 1.05)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower right", ncol=2)
        layers = sorted({x for series in kinds.values() for x, _ in series})
        if layers and len(layers) <= 40:
            step = max(1, len(layers) // 10)
            a.set_xticks(layers[::step])

    if shots:
        ax = axes[2]
        xs = [s["shot"] for s in shots]
        lines = ax.plot(xs, [max(s["estimated_loss"], 1e-12) for s in shots], color="tab:red", marker="o", ms=4,
                        label="estimated loss increase")
        ax.set_yscale("log")
        ax.set_xlabel("shot")
        ax.set_ylabel("estimated loss increase (this shot)", color="tab:red")
        ax.grid(alpha=0.3)
        ax.set_title("per shot")
        ppl = [(s["shot"], s["ppl"]) for s in shots if s.get("ppl") is not None]
        if ppl:
            twin = ax.twinx()
            px, py = zip(*ppl)
            lines += twin.plot(px, py, color="tab:green", marker="s", ms=4, label="perplexity after the shot")
            twin.set_ylabel("perplexity", color="tab:green")
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper left")
        if len(xs) <= 40:
            ax.set_xticks(xs[:: max(1, len(xs) // 10)])

    structure = report.config.get("structure", "")
    size = f"{report.size:.3f} of {report.params_before:,} prunable weights remain" if report.params_before else ""
    fig.suptitle(f"{report.method} {structure} — {report.model or 'model'}: {size}", fontsize=10)
    if path is not None:
        fig.savefig(Path(path), dpi=dpi)
    return fig
