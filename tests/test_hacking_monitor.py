"""The reward-hacking monitor (flowopd/train/monitor.py): its statistics on constructed images, the values a tiny
GRPO run logs, and the ``diagnostics monitor`` plot (issue 23)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _tiny_runs import tiny_recipe

from flowopd.train.diagnostics import main as diagnostics_main
from flowopd.train.monitor import (
    BLANK_STD,
    ImageMonitor,
    blank_rate,
    group_diversity,
    image_std,
    monitor_metrics,
)


def test_blank_batch_has_rate_one_and_zero_std():
    images = torch.full((4, 3, 8, 8), 0.5)
    images[1] = 0.0
    assert blank_rate(images) == 1.0
    assert torch.equal(image_std(images), torch.zeros(4, dtype=torch.float64))
    faint = images + 0.5 * BLANK_STD * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    assert blank_rate(faint) == 1.0


def test_random_images_are_not_blank_and_identical_groups_have_no_diversity():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(6, 3, 8, 8, generator=g)
    groups = [0, 0, 0, 1, 1, 1]
    assert blank_rate(noise) == 0.0
    assert group_diversity(noise, groups) > 0.2  # uniform noise: per-pixel std about 0.29
    same = torch.cat([noise[:1].expand(3, -1, -1, -1), noise[3:4].expand(3, -1, -1, -1)])
    assert group_diversity(same, groups) == 0.0
    # one blank and one textured image of four: rate 1/2 over the two blank ones
    mixed = torch.cat([torch.zeros(2, 3, 8, 8), noise[:2]])
    m = monitor_metrics(mixed, [0, 0, 1, 1])
    assert m["monitor/blank_rate"] == 0.5
    assert m["monitor/group_diversity"] == pytest.approx(group_diversity(noise[:2], [1, 1]) / 2)
    assert m["monitor/image_std"] == pytest.approx(float(image_std(mixed).mean()))
    assert math.isnan(group_diversity(noise[:2], [0, 1]))  # no group with two images


def test_streaming_monitor_matches_the_batch_functions():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 16, 16, generator=g)
    images[2] = 0.25
    groups = np.array([3, 3, 7, 7, 3, 7, 9, 9])
    mon = ImageMonitor(groups)
    order = np.array([5, 0, 2, 7, 1, 3, 6, 4])  # batches in any order, as processes and batches split them
    for part in (order[:3], order[3:]):
        mon.add(images[torch.as_tensor(part)], part)
    got, want = mon.metrics(), monitor_metrics(images, groups)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
    # a reduce over processes sums the totals: two identical "processes" give the same values
    assert mon.metrics(lambda t: t * 2)["monitor/group_diversity"] == pytest.approx(want["monitor/group_diversity"])


@pytest.mark.parametrize("bad, match", [
    (torch.rand(3, 8, 8), r"\(N, 3, H, W\)"),
    (torch.rand(2, 1, 8, 8), r"\(N, 3, H, W\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "dtype"),
    (torch.rand(0, 3, 8, 8), "no images"),
])
def test_bad_shapes_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        monitor_metrics(bad, list(range(len(bad))))


def test_group_ids_must_match_the_images():
    with pytest.raises(ValueError, match="group_ids"):
        group_diversity(torch.rand(3, 3, 4, 4), [0, 0])
    with pytest.raises(ValueError, match="indices"):
        ImageMonitor([0, 0, 1]).add(torch.rand(2, 3, 4, 4), [0])
    with pytest.raises(ValueError, match="no images added"):
        ImageMonitor([0, 1]).metrics()


def _tiny_grpo_run(tmp_path):
    """A 2-iteration GRPO run of the shared tiny recipe (tests/_tiny_runs.py) on one thread."""
    from flowopd.train.__main__ import main as train_main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["grpo", str(tiny_recipe(tmp_path))]) == 0
    finally:
        torch.set_num_threads(previous)
    return tmp_path / "run"


def test_grpo_logs_the_monitor_and_the_plot_draws_it(tmp_path, capsys):
    run = _tiny_grpo_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["monitor/blank_rate"] <= 1.0
        assert row["monitor/image_std"] > 0
        assert row["monitor/group_diversity"] > 0  # two noise seeds per prompt give two different images
    out = tmp_path / "monitor.png"
    assert diagnostics_main(["monitor", str(run), "--out", str(out), "--labels", "tiny"]) == 0
    assert out.stat().st_size > 1000

    capsys.readouterr()
    assert diagnostics_main(["monitor", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and "\n" not in err
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward/total": 0.5}) + "\n")
    assert diagnostics_main(["monitor", str(old), "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no monitor/* metrics" in err and str(old) in err and "\n" not in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_plot_refuses_a_label_count_and_a_broken_log(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "monitor/image_std": 0.3}) + "\n{oops\n")
    assert diagnostics_main(["monitor", str(run), "--out", str(tmp_path / "a.png")]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "monitor/image_std": 0.3}) + "\n")
    assert diagnostics_main(["monitor", str(run), "--out", str(tmp_path / "b.png"), "--labels", "x", "y"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
    assert diagnostics_main(["monitor", str(run), "--out", str(tmp_path / "c.png")]) == 0  # a reward-free run
    assert (tmp_path / "c.png").stat().st_size > 1000
