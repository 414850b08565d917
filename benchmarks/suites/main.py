"""The README's results table: every method at its defaults on SmolLM2, both evaluation texts.

Structured LLM Surgeon is one schedule read at 90/80/70% size (the way the paper reports intermediate
targets); the schedule's step is the default config's (``shots`` for a 20% reduction).
"""

SIZES = (0.9, 0.8, 0.7)

VARIANTS = [{"label": "dense", "method": "dense", "structure": "none", "sparsity": 0.0}]

VARIANTS += [
    {"label": "llm-surgeon structured", "method": "llm-surgeon", "structure": "structured", "sparsity": 0.3,
     "config": {"shots": 12}, "checkpoints": {4: 0.9, 8: 0.8, 12: 0.7}},
]
for method in ("flap", "magnitude"):
    for size in SIZES:
        VARIANTS.append({"label": method, "method": method, "structure": "structured", "sparsity": round(1 - size, 4)})

for structure in ("unstructured", "2:4"):
    VARIANTS.append({"label": f"llm-surgeon {structure}", "method": "llm-surgeon", "structure": structure, "sparsity": 0.5})
    for method in ("admm", "sparsegpt", "wanda", "magnitude", "k-obd"):
        VARIANTS.append({"label": method, "method": method, "structure": structure, "sparsity": 0.5})
