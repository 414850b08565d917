"""Merge the rows of later runs into a results JSON: ``python benchmarks/merge_results.py BASE NEW [NEW ...]``.

A row of a NEW file replaces the BASE row with the same label, structure, target and repeat number
(``--repeat`` runs), or is added. Every
row keeps the ``versions``, ``command``, ``date`` and ``concurrent_jobs`` of the run that made it, so that
``freshness.py`` judges each row by its own code. BASE is rewritten in place (JSON and markdown).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_smollm2 import configuration, markdown  # noqa: E402

RUN_KEYS = ("versions", "command", "date", "concurrent_jobs", "deterministic")


def key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (*configuration(r), r.get("repeat"))


def stamped(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one results file, each carrying its run's records (a row's own win)."""
    return [{**{k: d[k] for k in RUN_KEYS if k in d}, **r} for r in d.get("rows", [])]


def merge(base: dict[str, Any], *new: dict[str, Any]) -> dict[str, Any]:
    rows = {key(r): r for r in stamped(base)}
    for d in new:
        rows.update({key(r): r for r in stamped(d)})
    return {**base, "rows": list(rows.values()), "command": "several runs: see each row's command"}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    base = Path(argv[0])
    out = merge(json.loads(base.read_text()), *(json.loads(Path(p).read_text()) for p in argv[1:]))
    base.write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(out))
    print(f"{base}: {len(out['rows'])} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
