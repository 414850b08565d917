"""What a pruning method needs to know about an architecture, in one place per model family.

A method sees a model as decoder layers holding prunable linears, and (for structured pruning) as
*structure groups*: sets of rows and columns of several linears that only make the model smaller when
removed together (an MLP channel is a row of the up projections and a column of the down projection).

Kinds of structure group (``StructureGroup.kind``, also the keys of :meth:`ModelAdapter.layer_shapes`):
``"attn"`` (attention heads; on grouped-query models a KV head with the queries that read it), ``"query"``
(grouped-query models only: one query head of every KV group, the KV heads untouched; its count is the
number of queries per KV group) and ``"mlp"`` (MLP channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Axis = Literal["row", "col"]
Attention = Literal["kv_group", "query", "both"]
ATTENTION_KINDS = ("kv_group", "query", "both")


@dataclass(frozen=True)
class Part:
    """One linear's share of a structure: ``block`` consecutive rows (outputs) or columns (inputs).

    With ``repeats > 1`` a structure owns ``repeats`` such blocks, ``stride`` apart: structure ``k`` is
    rows ``k·block + j·stride + [0, block)`` for ``j < repeats`` (a query slot: one head in every KV group).
    """

    linear: str
    axis: Axis
    block: int
    stride: int = 0
    repeats: int = 1

    @property
    def size(self) -> int:
        """Rows (or columns) of one structure."""
        return self.block * self.repeats

    def indices(self, structures: torch.Tensor) -> torch.Tensor:
        """Rows (or columns) of this part's linear that belong to the given structures."""
        structures = torch.as_tensor(structures, dtype=torch.long)
        dev = structures.device
        offsets = (torch.arange(self.repeats, device=dev)[:, None] * self.stride
                   + torch.arange(self.block, device=dev)).reshape(-1)
        return (structures[:, None] * self.block + offsets).reshape(-1)

    def sets(self, count: int) -> torch.Tensor:
        """``[count, size]``: the rows (or columns) of each of ``count`` structures."""
        return self.indices(torch.arange(count)).view(count, self.size)


@dataclass(frozen=True)
class StructureGroup:
    """The structures of one kind in one layer (its MLP channels, or its attention head groups).

    Structure ``k`` is block ``k`` of every part. All structures of a group have the same parameter
    count, so a global budget can weigh groups against each other.
    """

    name: str
    kind: Literal["attn", "query", "mlp"]
    layer: int
    parts: tuple[Part, ...]
    count: int
    params_per_structure: int
    #: structures of this kind in the unpruned config (what alignment rules are based on); None: unknown
    full_count: int | None = None

    @property
    def output_parts(self) -> tuple[Part, ...]:
        """The columns of the linear that reads the structures' output (o_proj, down_proj).

        Zeroing them alone silences a structure: the input-side rows then feed nothing.
        """
        return tuple(p for p in self.parts if p.axis == "col")


def slice_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding only the given output rows and/or input columns (bias follows rows)."""
    w = linear.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data
        out.bias.data.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    out.weight.requires_grad_(linear.weight.requires_grad)
    if out.bias is not None and linear.bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


class ModelAdapter:
    """Base class: subclasses name the layers, their linears, and how structures map onto them."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        #: group name -> indices, in the model as it was first given, of the structures still there
        self.kept: dict[str, torch.Tensor] = {}

    #: module path of the decoder layers, e.g. ``model.layers``
    layer_prefix: str = ""

    # -- layout -----------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layer_prefix)

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def layer_linear_names(self) -> tuple[str, ...]:
        """Prunable linears of one decoder layer, relative to the layer."""
        raise NotImplementedError

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears of one layer that read the very same input (they share one activation factor)."""
        raise NotImplementedError

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def layer_linears(self, i: int) -> dict[str, nn.Linear]:
        """Full names to modules for the prunable linears of layer ``i``."""
        layer = self.layers[i]
        return {f"{self.layer_prefix}.{i}.{n}": layer.get_submodule(n) for n in self.layer_linear_names()}

    def linears(self) -> dict[str, nn.Linear]:
        out: dict[str, nn.Linear] = {}
        for i in range(len(self.layers)):
            out.update(self.layer_linears(i))
        return out

    def prunable_params(self) -> int:
        """Weights of all prunable linears (embeddings, norms and lm_head excluded; biases excluded)."""
        return sum(m.weight.numel() for m in self.linears().values())

    def _set_linear(self, name: str, new: nn.Linear) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)

    # -- structures -------------------------------------------------------------------------------
    def structure_groups(self, attention: Attention = "kv_group") -> list[StructureGroup]:
        """The layers' structure groups at their current sizes; ``attention`` picks the attention kinds
        ('kv_group': "attn" groups, 'query': "query" groups, 'both': both; models without grouped-query
        attention have "attn" heads only, whatever is asked)."""
        raise NotImplementedError

    def keep_structures(self, group: StructureGroup, keep: torch.Tensor) -> None:
        """Physically shrink the group's linears to the structures ``keep`` (sorted indices)."""
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        drop = torch.ones(group.count, dtype=torch.bool)
        drop[keep] = False
        self.remove_structures([(group, drop.nonzero().flatten())])

    def remove_structures(self, removals: Sequence[tuple[StructureGroup, torch.Tensor]]) -> None:
        """Physically remove structures of several groups at once (e.g. KV groups and query slots of one layer).

        Indices refer to the groups as given (all built from the current model); every linear is sliced
        once, to the complement of the union of what its parts lose, so groups that share a linear stay
        consistent.
        """
        for (name, axis), drop in self.dropped(removals).items():
            lin = self.module(name)
            keep = (~drop).nonzero().flatten()
            self._set_linear(name, slice_linear(lin, rows=keep) if axis == "row" else slice_linear(lin, cols=keep))
        for layer in sorted({g.layer for g, rm in removals if len(rm)}):
            self._after_resize(layer)
        for group, rm in removals:
            keep = torch.ones(group.count, dtype=torch.bool)
            keep[torch.as_tensor(rm, dtype=torch.long)] = False
            if not bool(keep.all()):
                self.kept[group.name] = self.kept.get(group.name, torch.arange(group.count))[keep.nonzero().flatten()]

    def freed_params(self, removals: Sequence[tuple[StructureGroup, torch.Tensor]]) -> int:
        """Weights that :meth:`remove_structures` would remove (a weight lost to two groups counts once)."""
        drops = self.dropped(removals)
        freed = 0
        for name in {n for n, _ in drops}:
            R, C = self.module(name).weight.shape
            r = int(drops[(name, "row")].sum()) if (name, "row") in drops else 0
            c = int(drops[(name, "col")].sum()) if (name, "col") in drops else 0
            freed += R * C - (R - r) * (C - c)
        return freed

    def dropped(self, removals: Sequence[tuple[StructureGroup, torch.Tensor]]) -> dict[tuple[str, str], torch.Tensor]:
        """(linear, axis) -> boolean mask of the rows/columns that the removals take away."""
        drops: dict[tuple[str, str], torch.Tensor] = {}
        for group, rm in removals:
            rm = torch.as_tensor(rm, dtype=torch.long).flatten().cpu()
            if rm.numel() and (int(rm.min()) < 0 or int(rm.max()) >= group.count):
                raise IndexError(f"{group.name}: structure index out of range for {group.count} structures")
            if torch.unique(rm).numel() >= group.count:
                raise ValueError(f"{group.name}: at least one structure must remain")
            if rm.numel() == 0:
                continue
            for part in group.parts:
                key = (part.linear, part.axis)
                if key not in drops:
                    lin = self.module(part.linear)
                    drops[key] = torch.zeros(lin.out_features if part.axis == "row" else lin.in_features, dtype=torch.bool)
                drops[key][part.indices(rm)] = True
        return drops

    def _after_resize(self, layer: int) -> None:
        """Update module attributes that cache sizes (e.g. a head count used in ``view``)."""

    # -- shapes for saving and reloading -----------------------------------------------------------
    def layer_shapes(self) -> list[dict[str, int]]:
        """Per layer, the number of structures of each kind (saved in the config of a pruned model).

        Always ``"attn"`` and ``"mlp"``; ``"query"`` (queries per KV group) only in layers where it differs
        from the unpruned config, so models pruned by whole KV groups keep the format they always had.
        """
        shapes: list[dict[str, int]] = [{} for _ in self.layers]
        for g in self.structure_groups(attention="both"):
            if g.kind != "query" or g.count != self.dense_queries_per_kv():
                shapes[g.layer][g.kind] = g.count
        return shapes

    def dense_queries_per_kv(self) -> int:
        """Query heads per KV group of the unpruned config (1 without grouped-query attention)."""
        return 1

    def stock_config(self, shape: dict[str, int]) -> dict[str, int] | None:
        """Config fields that make the family's stock config build every layer at ``shape`` (a
        :meth:`layer_shapes` entry), or None where the stock config cannot say it (the saved config then
        carries the per-layer shapes instead)."""
        return None

    def apply_layer_shapes(self, shapes: list[dict[str, int]]) -> None:
        """Resize a freshly built dense model to saved per-layer shapes (weights are loaded after).

        Kinds that share linears (query slots and KV groups) are applied one after the other, each on
        groups rebuilt at the sizes the previous one left.
        """
        if len(shapes) != len(self.layers):
            raise ValueError(f"saved shapes describe {len(shapes)} layers, the model has {len(self.layers)}")
        for kind in ("query", "attn", "mlp"):
            for g in self.structure_groups(attention="both"):
                n = shapes[g.layer].get(g.kind, g.count)
                if g.kind == kind and n != g.count:
                    if not 1 <= n <= g.count:
                        raise ValueError(f"saved shape of layer {g.layer} asks for {n} {kind} structures, "
                                         f"the model has {g.count}")
                    self.keep_structures(g, torch.arange(n))
