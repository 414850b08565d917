"""Unstructured 50% and 2:4 LLM Surgeon ablation (8 shots): what each update option buys.

The defaults (the exact masked optimum by CG after each shot's mask) are the `llm-surgeon unstructured`
and `llm-surgeon 2:4` rows of `smollm2.json`; the `obs` rows are the library before this ablation.
"""

DISTIL = {"lowrank_rank": 16, "lowrank_target": "dense", "lowrank_holdout": 0.125, "lowrank_masked": True,
          "lowrank_steps": 40, "lowrank_eval_every": 5, "lowrank_final": True}


def v(label, structure, config):
    return {"label": label, "method": "llm-surgeon", "structure": structure, "sparsity": 0.5,
            "config": {"shots": 8, **config}}


VARIANTS = [
    v("B1 before: chunked OBS, earlier zeros re-zeroed after each solve (solver=obs)", "unstructured", {"solver": "obs"}),
    v("B2 chunked OBS with earlier zeros as constraints (solver=obs, constrain_removed)", "unstructured",
      {"solver": "obs", "constrain_removed": True}),
    v("B3 defaults reconstructing the dense weights (reference=dense)", "unstructured", {"reference": "dense"}),
    v("B4 defaults + low-rank fit to the dense model (KL, 1/8 held out, masked adapters)", "unstructured", DISTIL),
    v("C1 2:4 before: chunked OBS (solver=obs)", "2:4", {"solver": "obs"}),
]
