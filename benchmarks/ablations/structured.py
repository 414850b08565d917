"""Structured LLM Surgeon ablation: the defaults with one setting changed per row.

Every row is one schedule to 70% size read at 90/80/70% (12 shots = 2.5% of the size per shot, as the
defaults' 8 shots to 80%). The defaults themselves are the `llm-surgeon structured` rows of
`smollm2-structured.json` (run alone on the GPU); the first row is the library before this ablation.
Rows A1-A6 were measured at 84434bd/394162c (`ablation-structured.json`, the defaults of then: damping
of A 0.01); A7-A8 are this file's second part (`ablation-structured-2.json`); the damping of A and the
Fisher's labels have their own table (`damping.py`).
"""

CK12 = {4: 0.9, 8: 0.8, 12: 0.7}
D = {"shots": 12}  # defaults: output-side update and cost, per-parameter ranking, KV groups, align 64 in every shot


def v(label, config, ck=CK12):
    return {"label": label, "method": "llm-surgeon", "structure": "structured", "sparsity": 0.3,
            "config": {**D, **config}, "checkpoints": ck}


VARIANTS = [
    v("A1 before: every part updated, summed cost, absolute cost, exact widths",
      {"structured_update": "all", "structured_cost": "sum", "structured_rank": "cost", "align": 1}),
    v("A6 defaults + query-slot structures beside KV groups (attention=both)", {"attention": "both"}),
    # issue 15: where the alignment is enforced, and what one shape for every layer costs
    v("A7 align 64 enforced in every shot (align_when=shot)", {"align_when": "shot"}),
    v("A8 one shape for every layer (allocation=uniform): a stock config", {"allocation": "uniform"}),
]
