"""Llama-family decoders: Llama, Mistral, Qwen2/Qwen3, SmolLM2 (grouped-query attention included).

Attention shrinks in two ways that both leave a plain Llama layer, which the stock attention code (one
``num_key_value_groups`` per module) and inference kernels (SDPA, flash attention) run unchanged:

- whole key/value groups ("attn"): a KV head together with the query heads that read it;
- query slots ("query"): the same query position in every KV group, so each group keeps its KV head and
  all groups keep the same number of queries. A slot is ``1 / queries_per_kv`` of the layer's queries,
  finer than a KV group and without touching the KV cache.

Removing only some query heads of one group would leave groups of unequal size, which no stock kernel runs.
"""

from __future__ import annotations

from .base import ATTENTION_KINDS, Attention, ModelAdapter, Part, StructureGroup


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    layer_prefix = "model.layers"

    @property
    def queries_per_kv(self) -> int:
        return self.layers[0].self_attn.num_key_value_groups

    def dense_queries_per_kv(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads

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

    def structure_groups(self, attention: Attention = "kv_group") -> list[StructureGroup]:
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        hd, hidden = self.head_dim, self.config.hidden_size
        groups = []
        for i, layer in enumerate(self.layers):
            p = f"{self.layer_prefix}.{i}"
            attn = layer.self_attn
            n_kv = attn.k_proj.out_features // hd
            rep = attn.q_proj.out_features // (hd * n_kv)  # queries per KV group in this layer
            if attention in ("kv_group", "both"):
                groups.append(StructureGroup(
                    name=f"{p}.self_attn", kind="attn", layer=i,
                    parts=(
                        Part(f"{p}.self_attn.q_proj", "row", rep * hd),
                        Part(f"{p}.self_attn.k_proj", "row", hd),
                        Part(f"{p}.self_attn.v_proj", "row", hd),
                        Part(f"{p}.self_attn.o_proj", "col", rep * hd),
                    ),
                    count=n_kv,
                    params_per_structure=hidden * hd * (2 * rep + 2),
                ))
            if attention in ("query", "both"):
                groups.append(StructureGroup(
                    name=f"{p}.self_attn.query", kind="query", layer=i,
                    parts=(
                        Part(f"{p}.self_attn.q_proj", "row", hd, stride=rep * hd, repeats=n_kv),
                        Part(f"{p}.self_attn.o_proj", "col", hd, stride=rep * hd, repeats=n_kv),
                    ),
                    count=rep,
                    params_per_structure=2 * hidden * hd * n_kv,
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
                full_count=self.config.intermediate_size,
            ))
        return groups

    def _after_resize(self, layer: int) -> None:
        attn = self.layers[layer].self_attn
        n_kv = attn.k_proj.out_features // attn.head_dim
        n_q = attn.q_proj.out_features // attn.head_dim
        attn.num_key_value_groups = n_q // n_kv
        for name, value in (("num_heads", n_q), ("num_key_value_heads", n_kv)):  # older transformers cache these
            if hasattr(attn, name):
                setattr(attn, name, value)

    def stock_config(self, shape: dict[str, int]) -> dict[str, int]:
        """Head and width counts of a stock config whose layers all have ``shape``. ``head_dim`` is written
        explicitly because ``hidden_size / num_attention_heads`` no longer gives it once heads are gone;
        every model type of this family reads it from the config."""
        groups = shape.get("attn", self.config.num_key_value_heads)
        queries = shape.get("query", self.dense_queries_per_kv())
        return {
            "num_attention_heads": groups * queries,
            "num_key_value_heads": groups,
            "intermediate_size": shape.get("mlp", self.config.intermediate_size),
            "head_dim": self.head_dim,
        }
