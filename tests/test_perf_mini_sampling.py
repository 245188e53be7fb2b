"""benchmarks/perf/mini_sampling.py: bad arguments are refused by name; a tiny run reports both paths and that
their outputs are identical (the timings themselves are never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "mini_sampling.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("flag", "value"), [("--repeats", "0"), ("--rollout-batch", "two"), ("--eval-batch", "-1"),
                                           ("--steps", "0")])
def test_bad_counts_are_refused_by_name(flag, value):
    done = run(flag, value)
    assert done.returncode == 2
    assert f"argument {flag}: {flag} must be an integer >= 1, got '{value}'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_tiny_run_reports_rates_ratios_and_identical_outputs():
    done = run("--repeats", "1", "--rollout-batch", "3", "--eval-batch", "2", "--steps", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| rollout rollouts/s (batch of 3) |" in out and "| evaluate images/s (batch of 2) |" in out
    assert out.count("| rollout rollouts/s") == out.count("| evaluate images/s") == 2  # per wall and CPU second
    assert "rollout: every path's outputs identical to the old path's bit for bit: yes" in out
    assert "evaluate: every path's outputs identical to the old path's bit for bit: yes" in out
