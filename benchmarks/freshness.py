"""Whether the results the README (and docs/) cite were made by the code at HEAD.

    python benchmarks/freshness.py          # one line per cited results JSON; exit 1 if any is stale

A results JSON records the code that made it in ``versions``: ``surgeon_git`` (the commit, ``+dirty``
when core files had uncommitted changes; see :func:`surgeon.report.git_commit`) and ``surgeon_core``
(a digest of the core files as they were, which also works in a copy of the tree without ``.git``).
It is **stale** when its core differs from the checkout's: a dirty commit, a commit whose core files
(``surgeon.report.core_pathspec()``) differ from HEAD's or, where no recorded commit can be compared, a
different digest. A commit git can compare decides alone: a digest taken over a partial copy of the tree differs
from its commit's (the GPU runs of 84434bd digested a copy of surgeon/ without rust/). It is
**unknown** when only a commit is recorded and this clone cannot compare it (no git, a shallow clone).
``"historical": true`` on the JSON, or on a row, exempts it: numbers kept on purpose from older code.
Rows may carry their own ``versions`` (results merged from several runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from surgeon.report import core_digest, core_pathspec  # noqa: E402

_CITATION = re.compile(r"benchmarks/results/([\w.+-]+?)\.(?:md|json)\b")
_BARE = re.compile(r"(?<![\w/.-])([\w+-][\w.+-]*?)\.(?:md|json)\b")  # `scale-unstructured.md` beside a full path


@dataclass
class Verdict:
    """``status``: fresh, stale, unknown or historical; ``reasons`` say why."""

    path: Path
    status: str
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status:<10} {self.path.name}" + (f": {'; '.join(self.reasons)}" if self.reasons else "")


def cited_results(*docs: Path, root: Path = ROOT) -> list[Path]:
    """The results JSONs these documents refer to: ``benchmarks/results/NAME.md`` or ``.json`` means
    ``NAME.json``, and so does a bare ``NAME.md`` when ``benchmarks/results/NAME.json`` exists."""
    results = root / "benchmarks" / "results"
    names: dict[str, None] = {}
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        names.update(dict.fromkeys(m.group(1) for m in _CITATION.finditer(text)))
        names.update(dict.fromkeys(m.group(1) for m in _BARE.finditer(text) if (results / f"{m.group(1)}.json").is_file()))
    return [results / f"{n}.json" for n in names]


def documents(root: Path = ROOT) -> list[Path]:
    """Where published numbers are cited: the README and the docs."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def check_versions(versions: dict[str, Any], repo: Path, digest: str | None = None) -> tuple[str, str]:
    """(status, reason) of one ``versions`` record against ``repo`` (``digest``: its core digest, if
    already computed)."""
    sha = str(versions.get("surgeon_git") or "unknown")
    core = versions.get("surgeon_core")
    if sha.endswith(("+dirty", "-dirty")):
        return "stale", f"made from a tree with uncommitted core changes ({sha})"
    found = None
    if sha != "unknown":
        sha = sha.split()[0]
        found = _git(repo, "rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}")
    if found is None or found.returncode != 0:  # no commit to compare: the digest decides
        if core is not None:
            if core != (digest or core_digest(repo)):
                return "stale", f"its core files (surgeon_core {str(core)[:19]}...) differ from this checkout's"
            return "fresh", ""
        if sha == "unknown":
            return "stale", "records neither its commit (versions.surgeon_git) nor its core digest"
        why = "git is not available" if found is None else f"commit {sha} is not in this clone (a shallow clone?)"
        return "unknown", why
    diff = _git(repo, "diff", "--name-only", sha, "HEAD", "--", *core_pathspec())
    if diff is None or diff.returncode != 0:
        return "unknown", f"git diff {sha} HEAD failed: {diff.stderr.strip() if diff else 'no git'}"
    changed = diff.stdout.split()
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return "stale", f"core files changed since {sha}: {', '.join(changed[:5])}{more}"
    return "fresh", ""


def check_results(path: Path, repo: Path = ROOT) -> Verdict:
    """The verdict on one results JSON (see the module docstring)."""
    if not path.is_file():
        return Verdict(path, "stale", ["the README cites it, but it does not exist"])
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("historical") is True:
        return Verdict(path, "historical", [str(d.get("historical_reason", "marked historical"))])
    rows = [r for r in d.get("rows", []) if isinstance(r, dict)]
    live = [r for r in rows if r.get("historical") is not True]
    if rows and not live:
        return Verdict(path, "historical", ["every row is marked historical"])
    records = [r["versions"] for r in live if isinstance(r.get("versions"), dict)]
    if not rows or any(not isinstance(r.get("versions"), dict) for r in live):
        records.insert(0, d.get("versions") or {})
    digest = core_digest(repo)
    found = [check_versions(v, repo, digest) for v in records]
    for status in ("stale", "unknown"):
        reasons = list(dict.fromkeys(why for s, why in found if s == status))
        if reasons:
            return Verdict(path, status, reasons)
    return Verdict(path, "fresh")


def main() -> int:
    verdicts = [check_results(p) for p in cited_results(*documents())]
    for v in verdicts:
        print(v)
    return 1 if any(v.status == "stale" for v in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
