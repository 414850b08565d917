"""The decode-bound arithmetic of benchmarks/decode_bound.py on a hand-made serving table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import decode_bound  # noqa: E402


def table():
    return {"model": "LlamaForCausalLM, hidden 64, 2 layers, 4 heads, 4 KV heads",
            "protocol": {"decode": "one token after a 9-token prompt in a static KV cache (10 slots)"},
            "rows": [{"method": "dense", "variant": "dense", "target": 1.0, "weight_bytes": 100_000,
                      "layers": [[4, 4, 128], [4, 4, 128]], "decode_speedup_b1": 1.0, "decode_speedup_b16": 1.0},
                     {"method": "llm-surgeon", "variant": "pruned", "target": 0.8, "weight_bytes": 80_000,
                      "layers": [[4, 4, 96], [2, 2, 96]], "decode_speedup_b1": 1.1, "decode_speedup_b16": None}]}


def test_bytes_are_weights_plus_every_kv_slot():
    dense, pruned = table()["rows"]
    # 8 KV heads x 16 dims x (K and V) x 2 bytes x 10 slots x 3 sequences
    assert decode_bound.step_bytes(dense, 3, 10, 16) == 100_000 + 8 * 16 * 2 * 2 * 10 * 3
    assert decode_bound.step_bytes(pruned, 1, 10, 16) == 80_000 + 6 * 16 * 2 * 2 * 10


def test_bound_falls_with_the_batch_when_the_cache_is_kept():
    rows = decode_bound.bounds(table())
    dense, pruned = rows
    assert dense["bound_b1"] == dense["bound_b16"] == 1.0
    b1 = (100_000 + 8 * 640) / (80_000 + 6 * 640)
    b16 = (100_000 + 8 * 640 * 16) / (80_000 + 6 * 640 * 16)
    assert pruned["bound_b1"] == round(b1, 3) and pruned["bound_b16"] == round(b16, 3)
    assert pruned["of_bound_b1"] == round(1.1 / b1, 3) and pruned["of_bound_b16"] is None
