"""Unstructured 50% and 2:4 LLM Surgeon ablation (8 shots): what the exact masked solve buys, and low-rank
updates that do not fit the calibration domain.

The defaults (the exact masked optimum by CG after each shot's mask) are the `llm-surgeon unstructured`
and `llm-surgeon 2:4` rows of `smollm2.json`; the `obs` rows are the library before this ablation.
"""


def v(label, structure, config):
    return {"label": label, "method": "llm-surgeon", "structure": structure, "sparsity": 0.5,
            "config": {"shots": 8, **config}}


# 2:4 rows C1-C17 ran when N:M damped A by 0.01 of its mean diagonal: they name it, so they run what they ran
MEAN_A = {"damp_a": 0.01, "damp_mode_a": "mean"}

VARIANTS = [
    v("B1 before: chunked OBS, earlier zeros re-zeroed after each solve (solver=obs)", "unstructured", {"solver": "obs"}),
    v("B2 CG towards the dense weights (reference=dense)", "unstructured", {"reference": "dense"}),
    v("B3 + low-rank updates distilled from the dense model, through the mask, held-out step choice",
      "unstructured", {"lowrank_rank": 16, "lowrank_target": "dense", "lowrank_masked": True, "lowrank_holdout": 0.1}),
    v("C1 2:4 before: chunked OBS (solver=obs)", "2:4", {**MEAN_A, "solver": "obs"}),
    v("C2 2:4 CG towards the dense weights (reference=dense)", "2:4", {**MEAN_A, "reference": "dense"}),
    # what made structured runs better out of domain: a damped A and labels drawn from the model (C4 is the
    # N:M default since 58be4a7; C5 names the empirical Fisher it ran with, the default of then)
    v("C3 2:4 damping of A 0.1", "2:4", {**MEAN_A, "damp_a": 0.1}),
    v("C4 2:4 sampled Fisher", "2:4", {**MEAN_A, "fisher": "sampled"}),
    v("C5 2:4 damping of G 1.0 (better on held-out windows on the CPU)", "2:4", {**MEAN_A, "damp_g": 1.0, "fisher": "empirical"}),
    v("B4 unstructured sampled Fisher", "unstructured", {"fisher": "sampled"}),
    # the mask the shots chose, refilled by layer-wise least squares toward the dense outputs (the 2:4 default)
    v("C6 2:4 before: the shots' own weights, no refit (refit=none)", "2:4", {**MEAN_A, "refit": "none", "nm_final_mask": "kfac"}),
    v("B5 unstructured refitted to the dense outputs (refit=admm)", "unstructured", {"refit": "admm"}),
    # the converse: ADMM's mask (gradual selection on each linear's A) in the last shot, the K-FAC update after it
    v("C7 2:4 last shot completed by ADMM's mask (nm_final_mask=admm)", "2:4", {**MEAN_A, "nm_final_mask": "admm"}),
    v("C8 2:4 one shot, ADMM's mask, the K-FAC update (nm_final_mask=admm, shots=1)", "2:4",
      {**MEAN_A, "nm_final_mask": "admm", "shots": 1}),
    # what else the ADMM-mask shots can take: labels from the model, and low-rank fits to the dense model's
    # predictions through the mask (held-out windows pick the step), with and without ADMM's mask
    v("C9 2:4 ADMM's last-shot mask, sampled Fisher (nm_final_mask=admm, fisher=sampled)", "2:4",
      {**MEAN_A, "nm_final_mask": "admm", "fisher": "sampled"}),
    v("C10 2:4 ADMM's last-shot mask + low-rank fits distilled from the dense model, through the mask, held-out "
      "step choice, one after the last shot too", "2:4",
      {**MEAN_A, "nm_final_mask": "admm", "lowrank_rank": 16, "lowrank_target": "dense", "lowrank_masked": True,
       "lowrank_holdout": 0.1, "lowrank_final": True}),
    v("C11 2:4 K-FAC mask + the same low-rank fits", "2:4",
      {**MEAN_A, "lowrank_rank": 16, "lowrank_target": "dense", "lowrank_masked": True, "lowrank_holdout": 0.1,
       "lowrank_final": True}),
    # between the two ends C7 (ADMM chooses the last shot's removals) and C8 (one shot): ADMM's selection in the
    # last k shots, the curvature re-estimated and the K-FAC update applied after each
    v("C12 2:4 ADMM's selection in every shot (nm_admm_shots=8)", "2:4", {**MEAN_A, "nm_admm_shots": 8}),
    v("C13 2:4 ADMM's selection in the last four shots (nm_admm_shots=4)", "2:4", {**MEAN_A, "nm_admm_shots": 4}),
    # the shots before the last paced per row, not per linear (benchmarks/results/nm-pacing.md: with 'layer' some
    # rows lose most of their share in the last shot)
    v("C14 2:4 every row paced toward its pattern (nm_allocation=row)", "2:4", {**MEAN_A, "nm_allocation": "row"}),
    # less of the calibration domain in the update: labels from the model (C4, now on the default's ADMM last-shot
    # mask) together with the damped A of C3 (better out of domain at 3d91d89)
    v("C15 2:4 sampled Fisher, damping of A 0.1", "2:4", {**MEAN_A, "fisher": "sampled", "damp_a": 0.1}),
    # the two that were each better on the CPU's held-out windows (C4, C5), together
    v("C16 2:4 sampled Fisher, damping of G 1.0", "2:4", {**MEAN_A, "fisher": "sampled", "damp_g": 1.0}),
    # between the default's damping of A (0.01: best calibration perplexity) and C15's 0.1 (best out of domain in
    # three runs, repeat-24c.md): where the trade between the two texts lies
    v("C17 2:4 sampled Fisher, damping of A 0.03", "2:4", {**MEAN_A, "fisher": "sampled", "damp_a": 0.03}),
    # A damped as ADMM damps its Gram matrix (0.1 of each input's own variance, not of the mean one): the mean
    # form is set by a few outlier channels, so it damps every other input far more than ADMM does
    v("C18 2:4 sampled Fisher, A damped 0.1 of its own diagonal (damp_mode_a=diagonal)", "2:4",
      {"fisher": "sampled", "damp_a": 0.1, "damp_mode_a": "diagonal"}),
    # the same form a third and three times as strong, and for unstructured 50% (empirical Fisher, its default)
    v("C19 2:4 sampled Fisher, A damped 0.03 of its own diagonal", "2:4",
      {"fisher": "sampled", "damp_a": 0.03, "damp_mode_a": "diagonal"}),
    v("C20 2:4 sampled Fisher, A damped 0.3 of its own diagonal", "2:4",
      {"fisher": "sampled", "damp_a": 0.3, "damp_mode_a": "diagonal"}),
    v("B6 unstructured, A damped 0.1 of its own diagonal", "unstructured", {"damp_a": 0.1, "damp_mode_a": "diagonal"}),
]
