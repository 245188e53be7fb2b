"""``evaluate``'s default benchmarks are Table 1's four at the checkpoint's scale, and ``--benchmarks all`` names
every benchmark of that scale (issue 23: the default evaluation under 60 s on 2 cores; the tables name theirs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import tomllib
from test_bad_input_bench import run

from flowopd.bench.evaluate import (
    MINI_DEFAULT_BENCHMARKS,
    SD35M_DEFAULT_BENCHMARKS,
    default_benchmarks,
    evaluate,
    scale_benchmarks,
)
from flowopd.bench.spec import all_specs

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_table_one_at_each_scale():
    columns = tomllib.loads((REPO / "reports/tables/table1.toml").read_text())["columns"]
    metrics = [c["metric"] for c in columns if "metric" in c]  # the Average column combines them
    table1 = {scale: tuple(m[scale].split("/")[0] for m in metrics) for scale in ("mini", "sd35m")}
    assert table1 == {"mini": MINI_DEFAULT_BENCHMARKS, "sd35m": SD35M_DEFAULT_BENCHMARKS}
    assert default_benchmarks(None) == list(MINI_DEFAULT_BENCHMARKS)
    assert default_benchmarks(SimpleNamespace(is_mini=True)) == list(MINI_DEFAULT_BENCHMARKS)
    assert default_benchmarks(SimpleNamespace(is_mini=False)) == list(SD35M_DEFAULT_BENCHMARKS)


def test_all_is_every_benchmark_of_the_scale():
    mini = scale_benchmarks(None)
    assert "mini-compbench" in mini and set(MINI_DEFAULT_BENCHMARKS) < set(mini)
    assert all(all_specs()[name].scale_name == "mini" for name in mini)
    sd35m = scale_benchmarks(SimpleNamespace(is_mini=False))
    assert set(SD35M_DEFAULT_BENCHMARKS) < set(sd35m) and not set(sd35m) & set(mini)


def test_all_mixed_with_names_is_refused(capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--benchmarks", "all,mini-ocr", "--out", str(tmp_path / "x"))
    assert code == 2 and "'all' stands alone" in err and "--benchmarks all,mini-ocr" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_default_evaluation_scores_table_one_only(tmp_path):
    results = evaluate(None, None, out=tmp_path / "run", limit=1, generation={"steps": 1}, progress=False)
    assert list(results["benchmarks"]) == list(MINI_DEFAULT_BENCHMARKS)
    everything = evaluate(None, ["all"], out=tmp_path / "run", limit=1, generation={"steps": 1}, progress=False)
    assert set(everything["benchmarks"]) == set(scale_benchmarks(None))
