"""Llama-family decoders: Llama, Mistral, Qwen2/Qwen3, SmolLM2 (grouped-query attention included).

Attention is pruned by whole key/value groups: a KV head together with the query heads that read it.
Removing only some query heads of a group would leave groups of unequal size, which the stock attention
code (one ``num_key_value_groups`` per module) cannot run; removing whole groups keeps every pruned layer
a plain Llama layer with fewer heads, so inference kernels (SDPA, flash attention) work unchanged.
"""

from __future__ import annotations

from .base import ModelAdapter, Part, StructureGroup


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    layer_prefix = "model.layers"

    @property
    def queries_per_kv(self) -> int:
        return self.layers[0].self_attn.num_key_value_groups

    def layer_linear_names(self) -> tuple[str, ...]:
        return (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        return (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        )

    def structure_groups(self) -> list[StructureGroup]:
        hd, rep = self.head_dim, self.queries_per_kv
        hidden = self.config.hidden_size
        groups = []
        for i, layer in enumerate(self.layers):
            p = f"{self.layer_prefix}.{i}"
            groups.append(StructureGroup(
                name=f"{p}.self_attn", kind="attn", layer=i,
                parts=(
                    Part(f"{p}.self_attn.q_proj", "row", rep * hd),
                    Part(f"{p}.self_attn.k_proj", "row", hd),
                    Part(f"{p}.self_attn.v_proj", "row", hd),
                    Part(f"{p}.self_attn.o_proj", "col", rep * hd),
                ),
                count=layer.self_attn.k_proj.out_features // hd,
                params_per_structure=hidden * hd * (2 * rep + 2),
            ))
            groups.append(StructureGroup(
                name=f"{p}.mlp", kind="mlp", layer=i,
                parts=(
                    Part(f"{p}.mlp.gate_proj", "row", 1),
                    Part(f"{p}.mlp.up_proj", "row", 1),
                    Part(f"{p}.mlp.down_proj", "col", 1),
                ),
                count=layer.mlp.gate_proj.out_features,
                params_per_structure=3 * hidden,
            ))
        return groups

    def stock_config(self, shape: dict[str, int]) -> dict[str, int]:
        """Head and width counts of a stock config whose layers all have ``shape``. ``head_dim`` is written
        explicitly because ``hidden_size / num_attention_heads`` no longer gives it once heads are gone;
        every model type of this family reads it from the config."""
        groups = shape.get("attn", self.config.num_key_value_heads)
        return {
            "num_attention_heads": groups * self.queries_per_kv,
            "num_key_value_heads": groups,
            "intermediate_size": shape.get("mlp", self.config.intermediate_size),
            "head_dim": self.head_dim,
        }
