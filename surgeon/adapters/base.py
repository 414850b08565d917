"""What a pruning method needs to know about an architecture, in one place per model family.

A method sees a model as decoder layers holding prunable linears, and (for structured pruning) as
*structure groups*: sets of rows and columns of several linears that only make the model smaller when
removed together (an MLP channel is a row of the up projections and a column of the down projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Axis = Literal["row", "col"]


@dataclass(frozen=True)
class Part:
    """One linear's share of a structure: ``block`` consecutive rows (outputs) or columns (inputs)."""

    linear: str
    axis: Axis
    block: int

    def indices(self, structures: torch.Tensor) -> torch.Tensor:
        """Rows (or columns) of this part's linear that belong to the given structures."""
        structures = torch.as_tensor(structures, dtype=torch.long)
        return (structures[:, None] * self.block + torch.arange(self.block, device=structures.device)).reshape(-1)


@dataclass(frozen=True)
class StructureGroup:
    """The structures of one kind in one layer (its MLP channels, or its attention head groups).

    Structure ``k`` is block ``k`` of every part. All structures of a group have the same parameter
    count, so a global budget can weigh groups against each other.
    """

    name: str
    kind: Literal["attn", "mlp"]
    layer: int
    parts: tuple[Part, ...]
    count: int
    params_per_structure: int


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
    def structure_groups(self) -> list[StructureGroup]:
        raise NotImplementedError

    def keep_structures(self, group: StructureGroup, keep: torch.Tensor) -> None:
        """Physically shrink the group's linears to the structures ``keep`` (sorted indices)."""
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        if keep.numel() == 0:
            raise ValueError(f"{group.name}: at least one structure must remain")
        for part in group.parts:
            lin = self.module(part.linear)
            idx = part.indices(keep)
            new = slice_linear(lin, rows=idx) if part.axis == "row" else slice_linear(lin, cols=idx)
            self._set_linear(part.linear, new)
        self._after_resize(group.layer)
        self.kept[group.name] = self.kept.get(group.name, torch.arange(group.count))[keep]

    def _after_resize(self, layer: int) -> None:
        """Update module attributes that cache sizes (e.g. a head count used in ``view``)."""

    # -- shapes for saving and reloading -----------------------------------------------------------
    def layer_shapes(self) -> list[dict[str, int]]:
        """Per layer, the number of structures of each kind (saved in the config of a pruned model)."""
        shapes: list[dict[str, int]] = [{} for _ in self.layers]
        for g in self.structure_groups():
            shapes[g.layer][g.kind] = g.count
        return shapes

    def stock_config(self, shape: dict[str, int]) -> dict[str, int] | None:
        """Config fields that make the family's stock config build every layer at ``shape`` (a
        :meth:`layer_shapes` entry), or None where the stock config cannot say it (the saved config then
        carries the per-layer shapes instead)."""
        return None

    def apply_layer_shapes(self, shapes: list[dict[str, int]]) -> None:
        """Resize a freshly built dense model to saved per-layer shapes (weights are loaded after)."""
        if len(shapes) != len(self.layers):
            raise ValueError(f"saved shapes describe {len(shapes)} layers, the model has {len(self.layers)}")
        for g in self.structure_groups():
            n = shapes[g.layer].get(g.kind, g.count)
            if n != g.count:
                self.keep_structures(g, torch.arange(n))
