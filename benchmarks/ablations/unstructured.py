"""Unstructured 50% and 2:4 LLM Surgeon ablation: each row one change to the update (8 shots)."""

BASE = {"shots": 8}
CG = {**BASE, "solver": "cg"}
DENSE = {**CG, "reference": "dense"}
LR = {**DENSE, "lowrank_rank": 16, "lowrank_target": "dense", "lowrank_holdout": 0.125, "lowrank_masked": True}


def v(label, structure, config):
    return {"label": label, "method": "llm-surgeon", "structure": structure, "sparsity": 0.5, "config": config}


VARIANTS = [
    v("U1 baseline: chunked OBS, earlier zeros free", "unstructured", BASE),
    v("U2 earlier zeros held at zero in the OBS solve (constrain_removed)", "unstructured", {**BASE, "constrain_removed": True}),
    v("U3 exact masked optimum in G x A by conjugate gradient (solver=cg)", "unstructured", CG),
    v("U4 U3 reconstructing the dense weights (reference=dense)", "unstructured", DENSE),
    v("U5 U4 with fp32 curvature passes (curvature_fp32)", "unstructured", {**DENSE, "curvature_fp32": True}),
    v("U6 U4 + low-rank fit to the dense model, held-out steps, masked adapters", "unstructured", LR),
    v("N1 2:4 baseline", "2:4", BASE),
    v("N2 2:4 solver=cg", "2:4", CG),
    v("N3 2:4 solver=cg, reference=dense", "2:4", DENSE),
    v("N4 2:4 N3 + low-rank fit to the dense model", "2:4", LR),
]
