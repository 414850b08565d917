"""Render a results JSON (DESIGN §5 format) as a markdown table: ``python benchmarks/table.py FILE [OUT.md]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("method", "variant", "structure", "target_kind", "target", "achieved", "ppl", "ood_ppl", "wall_s",
           "peak_gpu_gb", "params_after", "tokens_per_s_after", "tokens_per_s_dense", "error")


def render(d: dict, sections: tuple[str, ...] = (), columns: tuple[str, ...] = COLUMNS) -> str:
    """The header, the rows (``columns`` first, then the others by name), their phases and comparisons, then
    one titled table per key in ``sections``."""
    rows = d["rows"]
    cols = [c for c in columns if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r if k not in cols and not isinstance(r[k], (dict, list))})
    head = [f"# {d['benchmark']}", "", f"- command: `{d['command']}`", f"- date: {d['date']}", f"- device: {d['device']}",
            f"- versions: {json.dumps(d['versions'])}"]
    for key in ("historical_reason", "model", "protocol", "note"):
        if key in d:
            head.append(f"- {key}: {d[key] if isinstance(d[key], str) else json.dumps(d[key])}")
    return "\n".join(head + [""] + _table(cols, rows) + _phases(rows)
                     + _records("comparisons", d.get("comparisons", []))
                     + [line for key in sections for line in _records(key, d.get(key, []))]) + "\n"


def _table(cols: list[str], recs: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in recs]


def _records(title: str, recs: list[dict]) -> list[str]:
    """A titled table of ``recs`` with every key they hold as a column (none when there are none)."""
    if not recs:
        return []
    return ["", f"## {title}", ""] + _table(list(dict.fromkeys(k for r in recs for k in r)), recs)


def _phases(rows: list[dict]) -> list[str]:
    """One line per phase of the rows whose ``phases`` hold per-phase records (time, memory, estimates)."""
    recs = [{"method": r["method"], "structure": r["structure"], "layers": r.get("layers"), "phase": ph, **v}
            for r in rows if isinstance(r.get("phases"), dict)
            for ph, v in r["phases"].items() if isinstance(v, dict)]
    return _records("phases", recs)


def main() -> None:
    src = Path(sys.argv[1])
    md = render(json.loads(src.read_text()))
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".md")
    out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
