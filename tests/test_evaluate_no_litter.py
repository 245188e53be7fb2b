"""Bad input to ``evaluate`` leaves no run directory behind, and never removes a file (issue 21)."""

from __future__ import annotations

import pytest

from flowopd.bench.evaluate import _remove_empty_dirs, evaluate


def test_images_without_images_leaves_no_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        evaluate(None, ["mini-ocr"], images=empty, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_existing_out_directory_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        evaluate(None, ["mini-ocr"], images=empty, out=out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_remove_empty_dirs_keeps_every_file(tmp_path):
    root = tmp_path / "run"
    (root / "images" / "a" / "b").mkdir(parents=True)
    (root / "scores").mkdir()
    (root / "images" / "kept").mkdir()
    (root / "images" / "kept" / "0000.png").write_bytes(b"x")
    _remove_empty_dirs(root)
    assert (root / "images" / "kept" / "0000.png").read_bytes() == b"x"
    assert not (root / "scores").exists() and not (root / "images" / "a").exists()
    _remove_empty_dirs(tmp_path / "alone")  # a missing directory is no error
    lone = tmp_path / "lone"
    lone.mkdir()
    _remove_empty_dirs(lone)
    assert not lone.exists()
