"""The git revision a results.json records (flowopd.bench.results.git_revision): ``-dirty`` only when tracked files
outside reports/ differ, so regenerating one golden record does not taint the next; and ``evaluate`` writes the
current revision into a record it re-uses and re-scores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flowopd.bench import evaluate as evaluate_module
from flowopd.bench.evaluate import evaluate
from flowopd.bench.results import git_revision
from flowopd.models.loading import resolve_checkpoint


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout with code and one golden record under reports/, all committed."""
    root = tmp_path / "repo"
    (root / "reports" / "mini" / "base").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "reports" / "mini" / "base" / "results.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root


def test_a_clean_tree_records_its_commit(repo):
    assert git_revision(repo) == _git(repo, "rev-parse", "HEAD")


def test_changes_under_reports_and_untracked_files_leave_the_revision_clean(repo):
    (repo / "reports" / "mini" / "base" / "results.json").write_text('{"regenerated": true}\n')
    (repo / "reports" / "mini" / "base" / "table.md").write_text("new record\n")
    (repo / "scratch.py").write_text("untracked\n")
    assert git_revision(repo) == _git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize("change", ["modified", "staged"])
def test_a_tracked_change_outside_reports_makes_it_dirty(repo, change):
    if change == "modified":
        (repo / "code.py").write_text("x = 2\n")
    else:
        (repo / "new.py").write_text("y = 1\n")
        _git(repo, "add", "new.py")
    assert git_revision(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_a_directory_outside_a_checkout_has_no_revision(tmp_path):
    assert git_revision(tmp_path) is None


def test_evaluate_writes_the_current_revision_into_a_record_it_rescores(tmp_path, monkeypatch):
    kw = {"benchmarks": ["mini-ocr"], "out": tmp_path / "run", "limit": 2, "generation": {"steps": 2},
          "progress": False}
    first = evaluate("mini:base", log=lambda _: None, **kw)
    path = tmp_path / "run" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "git_revision": "0" * 40 + "-dirty"}))
    monkeypatch.setattr(evaluate_module, "git_revision", lambda: "1" * 40)
    logs: list[str] = []
    again = evaluate(resolve_checkpoint("mini:base"), log=logs.append, **kw)  # the value: the same record
    assert any("images cached" in line for line in logs)  # the record and its images were re-used
    assert again["created"] == first["created"] and again["metrics"] == first["metrics"]
    assert again["git_revision"] == json.loads(path.read_text())["git_revision"] == "1" * 40
