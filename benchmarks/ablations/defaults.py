"""The structured defaults before and after this commit's change, measured side by side by the same code.

The change (chosen on the calibration windows of `ablation-damping.md` row D3 and `ablation-structured-2.md`
row A7, both made at e222efd): labels drawn from the model for the structured Fisher (``fisher`` default
``sampled``) and the MLP width kept a multiple of ``align`` in every shot (``align_when="shot"``). The
defaults themselves are the `llm-surgeon structured` rows of `smollm2-structured.json`; this is the row
of the defaults before, one 12-shot schedule to 70% size read at 90/80/70%.
"""

CK12 = {4: 0.9, 8: 0.8, 12: 0.7}

VARIANTS = [
    {"label": "E0 before: empirical Fisher, alignment in the last shot (the defaults of e222efd)",
     "method": "llm-surgeon", "structure": "structured", "sparsity": 0.3,
     "config": {"shots": 12, "fisher": "empirical", "align_when": "end"}, "checkpoints": CK12},
]
