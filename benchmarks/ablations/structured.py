"""Structured LLM Surgeon ablation: one schedule to 70% size per variant, read at 90/80/70%.

Each step adds one change to the one before it (labels say which question it answers); the last rows vary
one setting of the best-looking combination. 12 shots = 2.5% of the size per shot, 24 shots = 1.25% (the
paper's step).
"""

CK12 = {4: 0.9, 8: 0.8, 12: 0.7}
CK24 = {8: 0.9, 16: 0.8, 24: 0.7}
BASE = {"shots": 12, "align": 1}
OUT = {**BASE, "structured_update": "output"}
OUTC = {**OUT, "structured_cost": "output"}
RANK = {**OUTC, "structured_rank": "per_param"}
ATTN = {**RANK, "attention": "both"}
FINE = {**ATTN, "shots": 24}


def v(label, config, ck=CK12):
    return {"label": label, "method": "llm-surgeon", "structure": "structured", "sparsity": 0.3, "config": config,
            "checkpoints": ck}


VARIANTS = [
    v("S1 baseline: all parts updated, summed cost, absolute cost, KV groups, exact widths", BASE),
    v("S2 does compensating only through down/o columns help? (update=output)", OUT),
    v("S3 + price a structure by its compensated part (cost=output)", OUTC),
    v("S4 + rank by cost per parameter (knapsack greedy)", RANK),
    v("S5 + query-slot attention structures beside KV groups (attention=both)", ATTN),
    v("S6 + finer schedule: 1.25% per shot (24 shots)", FINE, CK24),
    v("S7 S6 with MLP widths multiples of 64, rounded in the last shot (align=64 end)", {**FINE, "align": 64}, CK24),
    v("S8 S6 with MLP widths multiples of 64 in every shot (align=64 shot)", {**FINE, "align": 64, "align_when": "shot"}, CK24),
    v("S9 S7 with one shape for every layer (allocation=uniform)", {**FINE, "align": 64, "allocation": "uniform"}, CK24),
]
