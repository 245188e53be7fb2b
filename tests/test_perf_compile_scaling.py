"""benchmarks/perf: ``sd35m_perf.py --compile`` (both samplers timed again with the transformer compiled) and
``eval_scaling.py`` (evaluate images/s at 1 vs N processes): their options, and the compiled run on the tiny
configuration (slow: tracing the transformer takes tens of seconds on 2 cores)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf"
TINY = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--repeats", "1", "--warmup", "0",
        "--batch", "2", "--resolution", "32", "--skip-grpo"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def perf():
    yield _load("sd35m_perf")
    sys.modules.pop("sd35m_perf", None)


@pytest.fixture(scope="module")
def scaling():
    yield _load("eval_scaling")
    sys.modules.pop("eval_scaling", None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile-mode", "max-autotune"], "--compile-backend and --compile-mode need --compile"),
        (["--compile-backend", "eager"], "--compile-backend and --compile-mode need --compile"),
        (["--compile", "--compile-backend", "no-such-backend"], "--compile-backend 'no-such-backend' is not a"),
        (["--compile", "--compile-mode", "fastest"], "--compile-mode: invalid choice: 'fastest'"),
    ],
)
def test_bad_compile_options_are_refused(perf, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        perf.parse_args([*TINY, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    args = perf.parse_args([*TINY, "--compile"])
    assert (args.compile, args.compile_backend, args.compile_mode) == (True, "inductor", None)


@pytest.mark.slow
def test_compiled_samplers_are_timed_apart_and_match_the_eager_images(perf, one_thread):
    args = perf.parse_args([*TINY, "--compile", "--compile-backend", "eager"])
    result = perf.run(args)
    m, md = result.measurements, result.markdown
    for name in ("ours", "stock"):
        assert m[f"{name}_compiled_images_per_s"] > 0 and m[f"{name}_compiled_first_call_s"] > 0
    assert m["ratio_ours_compiled_over_stock"] == pytest.approx(
        m["ours_compiled_images_per_s"] / m["stock_images_per_s"])
    assert m["max_abs_image_diff_compiled"] == 0.0  # the eager backend runs the traced graph as written
    assert "## Sampling with the transformer compiled (`torch.compile`, backend eager, mode default)" in md
    assert "| ours, compiled |" in md and "Ratio ours compiled / stock uncompiled" in md
    assert result.policy.transformer is result.policy.pipe.transformer  # the eager module is back for the rest
    assert not hasattr(result.policy.transformer, "_orig_mod")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "one,two"], "--processes expects comma-separated integers"),
        (["--processes", "0,2"], "--processes must list counts >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--limit", "-3"], "--limit must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_scaling_options_are_refused(scaling, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scaling.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_scaling_runs_the_readme_commands_and_compares_rows(scaling, tmp_path):
    assert scaling.command(1, ["mini:base"])[1:] == ["-m", "flowopd.bench", "evaluate", "mini:base"]
    assert scaling.command(2, ["mini:base"])[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", "2", "-m", "flowopd.bench", "evaluate",
                                                     "mini:base"]
    rows = pd.DataFrame({"index": [1, 0], "sample": [0, 0], "score": [0.5, 1.0], "file": ["b", "a"]})
    for run, frame in (("a", rows), ("b", rows.iloc[::-1]), ("c", rows.assign(score=[0.5, 0.0]))):
        (tmp_path / run / "scores").mkdir(parents=True)
        frame.to_parquet(tmp_path / run / "scores" / "mini-x.parquet")
    assert scaling.same_rows(tmp_path / "a", tmp_path / "b")  # row order and file paths do not count
    assert not scaling.same_rows(tmp_path / "a", tmp_path / "c")
    one = [{"wall_s": 10.0, "cpu_s": 18.0, "images": 20, "rows": 30, "threads": None},
           {"wall_s": 30.0, "cpu_s": 22.0, "images": 20, "rows": 30, "threads": None}]
    two = [{"wall_s": 5.0, "cpu_s": 10.0, "images": 20, "rows": 30, "threads": 1}] * 2
    measured = {1: scaling.summarise(one), 2: scaling.summarise(two)}
    assert measured[1]["images_per_s"] == 1.0 and measured[1]["cpu_s_per_image"] == 1.0  # totals, not mean ratios
    table = scaling.render(measured, {1: True, 2: False}, "python benchmarks/perf/eval_scaling.py", ("1.0", "2.0"))
    assert "| 2 | 1 | 2 | 5.0 | 20 | 30 | 4.00 | 0.500 | 4.00 | no |" in table
