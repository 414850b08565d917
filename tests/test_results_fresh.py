"""Every results JSON the README cites comes from the code at HEAD (or says it is historical), and the
check behind that (benchmarks/freshness.py, surgeon.report.git_commit) works on a throwaway repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon import report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import freshness  # noqa: E402


def test_cited_results_come_from_the_code_at_head():
    cited = freshness.cited_results(*freshness.documents(REPO), root=REPO)
    assert len(cited) >= 5, "the README cites the results tables"
    verdicts = [freshness.check_results(p, REPO) for p in cited]
    stale = [str(v) for v in verdicts if v.status == "stale"]
    assert not stale, ("results cited by the README were made by other code; re-run their benchmarks "
                       "(or mark them \"historical\": true with a reason):\n" + "\n".join(stale))
    unknown = [str(v) for v in verdicts if v.status == "unknown"]
    if unknown:
        pytest.skip("cannot compare with the commits that made: " + "; ".join(unknown))


# -- the checker on a throwaway repository ------------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    for rel, text in {"surgeon/methods/m.py": "x = 1\n", "surgeon/cli.py": "cli = 1\n", "rust/lib.rs": "// k\n",
                      "README.md": "See `benchmarks/results/a.md` and `b.md`; `benchmarks/results/c.json`.\n",
                      "benchmarks/results/b.json": "{}"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "one")
    return root


def _commit(repo: Path, rel: str, text: str) -> str:
    (repo / rel).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"change {rel}")
    return _git(repo, "rev-parse", "--short", "HEAD")


def _results(repo: Path, name: str = "a", **top) -> Path:
    path = repo / "benchmarks" / "results" / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "rows": [{"ppl": 1.0}], **top}))
    return path


def test_citations_include_bare_names_of_existing_results(repo):
    cited = freshness.cited_results(repo / "README.md", root=repo)
    assert [p.name for p in cited] == ["a.json", "c.json", "b.json"]
    assert freshness.check_results(cited[1], repo).reasons == ["the README cites it, but it does not exist"]


def test_git_commit_is_marked_dirty_by_core_changes_only(repo):
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    assert report.git_commit(repo) == sha
    (repo / "surgeon/cli.py").write_text("cli = 2\n")  # not core: still clean
    (repo / "notes.txt").write_text("outside surgeon/ and rust/")
    assert report.git_commit(repo) == sha
    (repo / "surgeon/methods/new.py").write_text("")  # an untracked core file
    assert report.git_commit(repo) == sha + "+dirty"
    (repo / "surgeon/methods/new.py").unlink()
    (repo / "rust/lib.rs").write_text("// changed\n")
    assert report.git_commit(repo) == sha + "+dirty"


def test_git_commit_outside_a_checkout_of_its_own(repo, tmp_path, monkeypatch):
    monkeypatch.delenv(report.GIT_ENV, raising=False)
    assert report.git_commit(repo / "surgeon") == "unknown"  # inside another repository: not its own
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert report.git_commit(elsewhere) == "unknown"  # no repository at all
    monkeypatch.setenv(report.GIT_ENV, "abc1234")
    assert report.git_commit(repo / "surgeon") == "abc1234"


def test_fresh_until_the_core_changes(repo):
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    path = _results(repo, versions={"surgeon_git": sha})
    assert freshness.check_results(path, repo).status == "fresh"
    _commit(repo, "surgeon/cli.py", "cli = 3\n")  # presentation only
    _commit(repo, "README.md", "See `benchmarks/results/a.md`.\n")
    assert freshness.check_results(path, repo).status == "fresh"
    _commit(repo, "surgeon/methods/m.py", "x = 2\n")
    v = freshness.check_results(path, repo)
    assert v.status == "stale" and v.reasons == [f"core files changed since {sha}: surgeon/methods/m.py"]


@pytest.mark.parametrize("versions, status, reason", [
    ({"surgeon_git": "SHA+dirty"}, "stale", "uncommitted core changes"),
    ({"surgeon_git": "SHA-dirty"}, "stale", "uncommitted core changes"),
    ({}, "stale", "records neither its commit"),
    ({"surgeon_git": "unknown"}, "stale", "records neither its commit"),
    ({"surgeon_git": "0123456789ab"}, "unknown", "not in this clone"),
    ({"surgeon_git": "unknown", "surgeon_core": "DIGEST"}, "fresh", ""),
    ({"surgeon_git": "0123456789ab", "surgeon_core": "DIGEST"}, "fresh", ""),  # a copy without .git
    # a commit git can compare decides; a digest taken in another copy of the tree may differ
    ({"surgeon_git": "SHA", "surgeon_core": "sha256:0000"}, "fresh", ""),
    ({"surgeon_git": "unknown", "surgeon_core": "sha256:0000"}, "stale", "differ from this checkout's"),
    ({"surgeon_git": "0123456789ab", "surgeon_core": "sha256:0000"}, "stale", "differ from this checkout's"),
])
def test_verdicts(repo, versions, status, reason):
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    filled = {k: v.replace("SHA", sha).replace("DIGEST", report.core_digest(repo)) for k, v in versions.items()}
    v = freshness.check_results(_results(repo, versions=filled), repo)
    assert v.status == status and reason in "; ".join(v.reasons)


def test_core_digest_follows_content_not_git(repo):
    before = report.core_digest(repo)
    (repo / "surgeon/cli.py").write_text("cli = 9\n")
    (repo / "surgeon/methods/__pycache__").mkdir()
    (repo / "surgeon/methods/__pycache__/m.cpython-311.pyc").write_bytes(b"\0")
    (repo / "surgeon/_native.abi3.so").write_bytes(b"\0")
    assert report.core_digest(repo) == before  # presentation, caches and build outputs do not count
    copy = repo.parent / "copy"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    assert report.core_digest(copy) == before  # the same files without git
    (repo / "surgeon/methods/m.py").write_text("x = 5\n")
    assert report.core_digest(repo) != before


def test_historical_markers(repo):
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    old = {"surgeon_git": "0123456789ab+dirty"}
    v = freshness.check_results(_results(repo, versions=old, historical=True, historical_reason="kept on purpose"), repo)
    assert v.status == "historical" and v.reasons == ["kept on purpose"]
    path = repo / "benchmarks/results/a.json"
    path.write_text(json.dumps({"versions": old, "rows": [{"ppl": 1, "historical": True}]}))
    assert freshness.check_results(path, repo).status == "historical"
    # a live row with its own versions: judged by those, the historical row and stale top level left out
    path.write_text(json.dumps({"versions": old, "rows": [{"ppl": 1, "historical": True},
                                                          {"ppl": 2, "versions": {"surgeon_git": sha}}]}))
    assert freshness.check_results(path, repo).status == "fresh"
    path.write_text(json.dumps({"versions": old, "rows": [{"ppl": 1, "historical": True}, {"ppl": 2}]}))
    assert freshness.check_results(path, repo).status == "stale"


def test_versions_record_commit_and_core():
    v = report.versions()
    assert v["surgeon_core"] == report.core_digest(REPO) and v["surgeon_core"].startswith("sha256:")
    assert v["surgeon_git"] == report.git_commit(REPO)
