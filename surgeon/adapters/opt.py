"""OPT decoders (multi-head attention with biases, a two-layer ReLU MLP)."""

from __future__ import annotations

from .base import ATTENTION_KINDS, Attention, ModelAdapter, Part, StructureGroup


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)

    layer_prefix = "model.decoder.layers"

    def layer_linear_names(self) -> tuple[str, ...]:
        return ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        return (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",))

    def structure_groups(self, attention: Attention = "kv_group") -> list[StructureGroup]:
        """Multi-head attention: a head is its own KV group and query slot, so every ``attention`` gives heads."""
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        hd, hidden = self.head_dim, self.config.hidden_size
        groups = []
        for i, layer in enumerate(self.layers):
            p = f"{self.layer_prefix}.{i}"
            groups.append(StructureGroup(
                name=f"{p}.self_attn", kind="attn", layer=i,
                parts=(
                    Part(f"{p}.self_attn.q_proj", "row", hd),
                    Part(f"{p}.self_attn.k_proj", "row", hd),
                    Part(f"{p}.self_attn.v_proj", "row", hd),
                    Part(f"{p}.self_attn.out_proj", "col", hd),
                ),
                count=layer.self_attn.q_proj.out_features // hd,
                params_per_structure=4 * hidden * hd,
            ))
            groups.append(StructureGroup(
                name=f"{p}.mlp", kind="mlp", layer=i,
                parts=(Part(f"{p}.fc1", "row", 1), Part(f"{p}.fc2", "col", 1)),
                count=layer.fc1.out_features,
                params_per_structure=2 * hidden,
                full_count=self.config.ffn_dim,
            ))
        return groups

    def _after_resize(self, layer: int) -> None:
        attn = self.layers[layer].self_attn
        attn.num_heads = attn.q_proj.out_features // attn.head_dim
