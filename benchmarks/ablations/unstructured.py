"""Unstructured 50% and 2:4 LLM Surgeon ablation (8 shots): what the exact masked solve buys.

The defaults (the exact masked optimum by CG after each shot's mask) are the `llm-surgeon unstructured`
and `llm-surgeon 2:4` rows of `smollm2.json`; the `obs` rows are the library before this ablation.
"""


def v(label, structure, config):
    return {"label": label, "method": "llm-surgeon", "structure": structure, "sparsity": 0.5,
            "config": {"shots": 8, **config}}


VARIANTS = [
    v("B1 before: chunked OBS, earlier zeros re-zeroed after each solve (solver=obs)", "unstructured", {"solver": "obs"}),
    v("C1 2:4 before: chunked OBS (solver=obs)", "2:4", {"solver": "obs"}),
]
