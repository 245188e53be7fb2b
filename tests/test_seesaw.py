"""The seesaw figure: the points it evaluates, its clear errors, and its outputs from real evaluations."""

from __future__ import annotations

import csv

import pytest

from flowopd.paper import seesaw as S
from flowopd.paper.checkpoints import MissingCheckpointsError


def _checkpoint(run, it):
    d = run / "checkpoints" / f"iteration-{it:06d}" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_points_are_the_base_then_every_saved_checkpoint_in_order(tmp_path, monkeypatch):
    runs = {}
    for label in S.MINI_RUNS:
        run = tmp_path / label
        for it in (24, 12):
            _checkpoint(run, it)
        (run / "checkpoints" / "iteration-000036").mkdir()  # torn: no adapter, skipped
        runs[label] = (str(run), "grpo unused.toml")
    monkeypatch.setattr(S, "MINI_RUNS", runs)
    points = S.plan("mini")
    assert points[0] == S.Point("base", 0, "mini:base")
    assert [(p.run, p.iteration) for p in points[1:3]] == [("GRPO-GenEval", 12), ("GRPO-GenEval", 24)]
    assert len(points) == 1 + 2 * len(runs)


def test_missing_runs_are_named_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "MINI_RUNS", {"GRPO-OCR": (str(tmp_path / "none"), "grpo x.toml")})
    with pytest.raises(MissingCheckpointsError, match=r"GRPO-OCR .*--retrain"):
        S.plan("mini")
    config = tmp_path / "c.toml"
    config.write_text('[seesaw]\n"GRPO-GenEval" = ""\n')
    with pytest.raises(MissingCheckpointsError, match="lists no run directories"):
        S.plan("sd35m", config)


def test_real_evaluations_become_the_csv_table_and_figure(tmp_path, monkeypatch):
    """Two real checkpoints (the committed base twice, as iteration 0 and as a 'run' point) on a 4-prompt slice."""
    rows = []
    for run, it in (("base", 0), ("GRPO-GenEval", 12)):
        res = S.evaluate("mini:base", ["mini-ocr"], out=tmp_path / "eval", limit=4, progress=False, log=lambda _: None)
        rows.append({"run": run, "iteration": it, "benchmark": "mini-ocr", **S._metric(res, "mini-ocr")})
    paths = S.write_seesaw(rows, tmp_path / "out")
    table = list(csv.DictReader(paths["csv"].open()))
    assert [(r["run"], r["iteration"]) for r in table] == [("base", "0"), ("GRPO-GenEval", "12")]
    assert float(table[0]["ci_low"]) <= float(table[0]["value"]) <= float(table[0]["ci_high"])
    md = paths["md"].read_text()
    assert "| GRPO-GenEval | 12 |" in md and "(+0.000)" in md  # the same checkpoint: no change from the base
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
