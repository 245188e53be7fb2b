"""The committed mini checkpoints' recorded results pass their floors, and a raised floor fails `check`
(the CI gate of .ci/run, which re-evaluates the checkpoints and runs the same command)."""

import json
from pathlib import Path

import pytest

from flowopd.bench.check import load_thresholds
from flowopd.bench.cli import main

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = REPO / "benchmarks" / "thresholds.toml"
RESULTS = sorted((REPO / "reports" / "mini").glob("*/results.json"))


def test_every_committed_checkpoint_has_results_and_floors():
    from flowopd.models.mini import ASSETS_DIR

    committed = {f"mini:{p.name}" for p in ASSETS_DIR.iterdir() if p.is_dir()}
    recorded = {json.loads(p.read_text())["checkpoint"] for p in RESULTS}
    assert committed and committed <= recorded
    for name in committed:
        assert load_thresholds(THRESHOLDS, None, name)


@pytest.mark.parametrize("results", RESULTS, ids=lambda p: p.parent.name)
def test_check_passes_as_committed_and_fails_with_a_raised_floor(results, tmp_path, capsys):
    checkpoint = json.loads(results.read_text())["checkpoint"]
    assert main(["check", str(results), "--thresholds", str(THRESHOLDS)]) == 0
    floors = load_thresholds(THRESHOLDS, None, checkpoint)
    metric = sorted(floors)[0]
    value = json.loads(results.read_text())["metrics"][metric]
    raised = tmp_path / "raised.toml"
    lines = [f'[floors."{checkpoint}"]'] + [
        f'"{m}" = {value + 0.01 if m == metric else f}' for m, f in sorted(floors.items())
    ]
    raised.write_text("\n".join(lines) + "\n")
    assert main(["check", str(results), "--thresholds", str(raised)]) == 1
    assert f"{metric}: {value:.4f} is below its floor" in capsys.readouterr().out
