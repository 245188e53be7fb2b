"""Paired comparison of two runs: point values, paired intervals, pairing checks, compare_runs and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowopd.bench.aggregate import aggregate
from flowopd.bench.cli import main
from flowopd.bench.compare import (
    compare_combined,
    compare_runs,
    format_difference,
    mean_difference,
    paired_difference,
    table_weights,
)
from flowopd.bench.results import load_results, new_results, save_results

REPO = Path(__file__).resolve().parents[1]
RULES = [("mean", ""), ("mean_of_tag_means", "tag"), ("per_category", "category")]
GROUPS = ["alpha", "beta", "gamma"]


def frame(scores: np.ndarray, group_by: str = "tag") -> pd.DataFrame:
    """Per-sample rows for a (prompts x samples) score matrix; prompt i belongs to group i % 3."""
    n_prompts, n_samples = scores.shape
    rows = [
        {"index": i, "sample": k, "prompt": f"prompt {i}", "score": float(scores[i, k]),
         group_by or "tag": GROUPS[i % len(GROUPS)]}
        for i in range(n_prompts) for k in range(n_samples)
    ]
    return pd.DataFrame(rows)


def pair(seed: int = 0, n_prompts: int = 30, n_samples: int = 2, group_by: str = "tag"):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0, 1, size=(n_prompts, n_samples))
    a = np.clip(b + rng.normal(0.05, 0.2, size=b.shape), 0, 1)
    return frame(a, group_by), frame(b, group_by)


@pytest.mark.parametrize("rule,group_by", RULES)
def test_point_value_is_the_difference_of_aggregates(rule, group_by):
    df_a, df_b = pair(1, group_by=group_by or "tag")
    nan_rows = [3, 10, 11]  # NaN at the same pairs in both runs ("not applicable" prompts)
    df_a.loc[nan_rows, "score"] = np.nan
    df_b.loc[nan_rows, "score"] = np.nan
    diff = paired_difference(df_a, df_b, rule, group_by, n_boot=200)
    agg_a, agg_b = aggregate(df_a, rule, group_by), aggregate(df_b, rule, group_by)
    assert set(diff) == set(agg_a) == ({"mean"} if rule == "mean" else {"mean", *GROUPS})
    for name, m in diff.items():
        assert m.value == agg_a[name].value - agg_b[name].value
        assert m.n == agg_a[name].n
        assert m.ci_low <= m.value <= m.ci_high
    assert diff["mean"].n == len(df_a) - len(nan_rows)


@pytest.mark.parametrize("rule,group_by", RULES)
def test_identical_runs_give_zero_with_a_zero_interval(rule, group_by):
    df_a, _ = pair(2, group_by=group_by or "tag")
    diff = paired_difference(df_a, df_a.copy(), rule, group_by, n_boot=300)
    for m in diff.values():
        assert (m.value, m.ci_low, m.ci_high, m.stderr) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("rule,group_by", RULES)
def test_a_constant_shift_is_recovered_with_a_degenerate_interval(rule, group_by):
    _, df_b = pair(3, group_by=group_by or "tag")
    df_a = df_b.assign(score=df_b["score"] + 0.1)
    diff = paired_difference(df_a, df_b, rule, group_by, n_boot=300)
    for m in diff.values():
        assert m.value == pytest.approx(0.1, abs=1e-12)
        assert m.ci_low == pytest.approx(0.1, abs=1e-12) and m.ci_high == pytest.approx(0.1, abs=1e-12)
        assert m.stderr < 1e-12


def test_pairing_removes_prompt_difficulty_from_the_interval():
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0, 1, size=(60, 1))  # prompts from very easy to very hard
    b = difficulty + rng.normal(0, 0.02, size=(60, 4))
    a = b + rng.normal(0.01, 0.01, size=b.shape)
    df_a, df_b = frame(a), frame(b)
    paired = paired_difference(df_a, df_b, "mean", n_boot=2000)["mean"]
    unpaired_b = aggregate(df_b, "mean", n_boot=2000)["mean"]
    unpaired_a = aggregate(df_a, "mean", n_boot=2000)["mean"]
    half = (paired.ci_high - paired.ci_low) / 2
    assert half < 0.05 * (unpaired_b.ci_high - unpaired_b.ci_low) / 2
    assert half < 0.05 * (unpaired_a.ci_high - unpaired_a.ci_low) / 2
    assert paired.ci_low > 0  # the small real gain is resolved; the unpaired intervals overlap
    assert unpaired_a.ci_low < unpaired_b.ci_high


def test_a_one_sided_nan_drops_the_pair():
    df_a, df_b = pair(5)
    df_a.loc[7, "score"] = np.nan  # not scorable in A only: B's score of that image must leave too
    diff = paired_difference(df_a, df_b, "mean", n_boot=100)["mean"]
    keep = df_a["score"].notna()
    expected = aggregate(df_a[keep], "mean")["mean"].value - aggregate(df_b[keep], "mean")["mean"].value
    assert diff.value == expected
    assert diff.n == len(df_a) - 1


def test_different_pairs_or_prompts_raise():
    df_a, df_b = pair(6)
    with pytest.raises(ValueError, match=r"mini-x: .*1 only in A \(\(4, 1\)\), 0 only in B"):
        paired_difference(df_a, df_b.drop(index=9), label="mini-x")
    moved = df_b.copy()
    moved.loc[0, "sample"] = 7
    with pytest.raises(ValueError, match=r"only in B \(\(0, 7\)\)"):
        paired_difference(df_a, moved)
    renamed = df_b.copy()
    renamed.loc[renamed["index"] == 5, "prompt"] = "another prompt"
    with pytest.raises(ValueError, match="prompt index 5 has prompt 'prompt 5' in run A but 'another prompt'"):
        paired_difference(df_a, renamed)
    with pytest.raises(ValueError, match="more than once"):
        paired_difference(df_a, pd.concat([df_b, df_b.iloc[:1]]))


# -- run directories in evaluate's format ------------------------------------------------------------------

GENERATION = {"images_per_prompt": 2, "seed": 0, "height": 32, "width": 32, "steps": 10, "guidance_scale": 4.0}


def write_run(root: Path, checkpoint: str, frames: dict[str, tuple[pd.DataFrame, str, str]], **changes) -> Path:
    """A run dir as ``evaluate`` writes it: scores/<bench>.parquet and results.json's benchmarks[bench]."""
    (root / "scores").mkdir(parents=True)
    results = new_results(checkpoint)
    for name, (df, rule, group_by) in frames.items():
        df.to_parquet(root / "scores" / f"{name}.parquet", index=False)
        metrics = aggregate(df, rule, group_by)
        results["benchmarks"][name] = {
            "spec_version": "1", "scorer": name, "scorer_version": "1", "scale": [0.0, 1.0],
            "higher_is_better": True, "aggregation": rule, "generation": {**GENERATION, **changes},
            "images": str(root / "images" / name), "limit": None, "n_prompts": int(df["index"].nunique()),
            "n_images": len(df), "n_nan": int(df["score"].isna().sum()),
            "metrics": {k: m.to_dict() for k, m in metrics.items()},
        }
    save_results(results, root)
    return root


@pytest.fixture
def runs(tmp_path):
    geneval_a, geneval_b = pair(7, n_prompts=24, group_by="tag")
    ocr_b = frame(np.random.default_rng(8).uniform(0, 1, size=(16, 2)))
    ocr_a = ocr_b.assign(score=ocr_b["score"] + 0.1)
    run_a = write_run(tmp_path / "a", "mini:aaa", {"mini-geneval": (geneval_a, "mean_of_tag_means", "tag"),
                                                  "mini-ocr": (ocr_a, "mean", "")})
    run_b = write_run(tmp_path / "b", "mini:bbb", {"mini-geneval": (geneval_b, "mean_of_tag_means", "tag"),
                                                  "mini-ocr": (ocr_b, "mean", "")})
    return run_a, run_b


def test_compare_runs_rows(runs):
    run_a, run_b = runs
    rows = compare_runs(run_a, run_b, n_boot=300)
    assert [(r["benchmark"], r["metric"]) for r in rows] == [
        ("mini-geneval", "mean"), *[("mini-geneval", g) for g in GROUPS], ("mini-ocr", "mean")]
    res_a, res_b = load_results(run_a), load_results(run_b)
    for r in rows:
        key = f"{r['benchmark']}/{r['metric']}"
        assert r["value_a"] == pytest.approx(res_a["metrics"][key], abs=1e-12)
        assert r["value_b"] == pytest.approx(res_b["metrics"][key], abs=1e-12)
        assert r["diff"] == pytest.approx(r["value_a"] - r["value_b"], abs=1e-12)
        assert r["significant"] == (r["ci_low"] > 0 or r["ci_high"] < 0)
    ocr = rows[-1]
    assert ocr["diff"] == pytest.approx(0.1, abs=1e-12) and ocr["significant"] and ocr["n"] == 32
    only = compare_runs(run_a, run_b, benchmarks=["mini-ocr"], n_boot=50)
    assert [r["benchmark"] for r in only] == ["mini-ocr"]


def test_format_difference_marks_intervals_that_exclude_zero():
    assert format_difference(0.0123, 0.0031, 0.0224) == "+0.012 [+0.003, +0.022]*"
    assert format_difference(-0.02, -0.05, -0.001) == "-0.020 [-0.050, -0.001]*"
    assert format_difference(0.002, -0.008, 0.012) == "+0.002 [-0.008, +0.012]"
    # a difference that rounds to zero is not written "-0.000"; digits widen every number
    assert format_difference(-0.0004, -0.011, 0.011) == "+0.000 [-0.011, +0.011]"
    assert format_difference(0.00123, 0.0001, 0.0025, digits=4) == "+0.0012 [+0.0001, +0.0025]*"


def test_mean_difference_is_the_formatted_mean_row(runs):
    run_a, run_b = runs
    row = next(r for r in compare_runs(run_a, run_b, ["mini-ocr"]) if r["metric"] == "mean")
    cell = mean_difference(run_a, run_b, "mini-ocr")
    assert cell == format_difference(row["diff"], row["ci_low"], row["ci_high"])
    assert cell.startswith("+0.100 [") and cell.endswith("*")
    with pytest.raises(ValueError, match="mini-pick"):
        mean_difference(run_a, run_b, "mini-pick")


def test_compare_runs_refuses_unpairable_runs(runs, tmp_path):
    run_a, _ = runs
    df = frame(np.zeros((16, 2)))
    steps = write_run(tmp_path / "steps", "mini:ccc", {"mini-ocr": (df, "mean", "")}, steps=20)
    with pytest.raises(ValueError, match=r"mini-ocr: generation\.steps is 10 in .*a/results\.json but 20 in"):
        compare_runs(run_a, steps)
    with pytest.raises(ValueError, match=r"run B \(.*steps/results\.json\) has no results for benchmark "
                                         r"'mini-geneval' \(it has: mini-ocr\)"):
        compare_runs(run_a, steps, benchmarks=["mini-geneval"])
    res = json.loads((steps / "results.json").read_text())
    res["benchmarks"]["mini-ocr"]["generation"]["steps"] = 10
    res["benchmarks"]["mini-ocr"]["scorer_version"] = "2"
    (steps / "results.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="mini-ocr: scorer_version is '1' in .* but '2' in"):
        compare_runs(run_a, steps)


def test_cli_prints_and_writes_the_comparison(runs, tmp_path, capsys):
    run_a, run_b = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(run_a), str(run_b), "--out", str(out), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    assert "| benchmark | metric | A: mini:aaa | B: mini:bbb | A - B [95% paired CI] | |" in printed
    assert "| mini-ocr | mean |" in printed and "+0.100 [+0.100, +0.100] | * |" in printed
    assert (out / "compare.md").read_text().strip() in printed
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and {"checkpoint_a", "diff", "ci_low", "ci_high", "significant"} <= set(table[0])
    assert table[-1]["checkpoint_a"] == "mini:aaa" and float(table[-1]["diff"]) == pytest.approx(0.1)

    assert main(["compare", str(run_a), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1


def test_table1_average_weights():
    assert table_weights("table1") == ("Average", {"mini-geneval": 0.25, "mini-ocr": 0.25, "mini-quality": 0.05,
                                                   "mini-pick": 0.025})
    label, sd35m = table_weights("table1", "sd35m")
    assert label == "Average" and sd35m["pickscore"] == pytest.approx(1 / 104)
    with pytest.raises(ValueError, match="no combined column"):
        table_weights("table2")


def test_combined_resamples_benchmarks_on_the_same_images_jointly(tmp_path):
    # mini-quality scores mini-geneval's images (images_from): per prompt, the quality difference is built to
    # cancel 0.25 x the GenEval difference exactly, so the combined difference is the same on every joint draw
    rng = np.random.default_rng(11)
    n = 24  # 8 prompts per group: a stratified draw keeps the groups' sizes, so the tag-mean equals the mean
    delta = np.repeat(rng.uniform(-0.2, 0.2, size=(n, 1)), 2, axis=1)
    g_b = rng.uniform(0.3, 0.7, size=(n, 2))
    q_b = rng.uniform(2, 4, size=(n, 2))
    o_b = rng.uniform(0, 1, size=(16, 2))
    frames_b = {"mini-geneval": (frame(g_b), "mean_of_tag_means", "tag"), "mini-quality": (frame(q_b), "mean", ""),
                "mini-ocr": (frame(o_b), "mean", "")}
    frames_a = {"mini-geneval": (frame(g_b + delta), "mean_of_tag_means", "tag"),
                "mini-quality": (frame(q_b - 5 * delta + 0.5), "mean", ""), "mini-ocr": (frame(o_b + 0.1), "mean", "")}
    run_a, run_b = write_run(tmp_path / "a", "mini:aaa", frames_a), write_run(tmp_path / "b", "mini:bbb", frames_b)
    weights = {"mini-geneval": 0.25, "mini-quality": 0.05, "mini-ocr": 0.25}
    row = compare_combined(run_a, run_b, weights, label="avg", n_boot=400)
    per = {r["benchmark"]: r for r in compare_runs(run_a, run_b, n_boot=50) if r["metric"] == "mean"}
    assert row["value_a"] == pytest.approx(sum(w * per[b]["value_a"] for b, w in weights.items()), abs=1e-12)
    assert row["value_b"] == pytest.approx(sum(w * per[b]["value_b"] for b, w in weights.items()), abs=1e-12)
    assert row["diff"] == pytest.approx(0.05, abs=1e-9)  # 0.25 x 0.1 (OCR) + 0.05 x 0.5 (the cancelling pair)
    assert row["ci_low"] == pytest.approx(0.05, abs=1e-9) and row["ci_high"] == pytest.approx(0.05, abs=1e-9)
    assert row["significant"] and row["benchmark"] == "avg"
    # resampled independently, GenEval and quality would each carry their own spread
    assert per["mini-geneval"]["ci_high"] - per["mini-geneval"]["ci_low"] > 0.02
    with pytest.raises(ValueError, match="has no results for benchmark 'mini-pick'"):
        compare_combined(run_a, run_b, {**weights, "mini-pick": 0.025})
    assert main(["compare", str(run_a), str(run_b), "--combined", "table1"]) == 2


@pytest.mark.skipif(not (REPO / "reports/mini/grpo-pick/results.json").is_file(), reason="no committed mini runs")
def test_committed_mini_runs():
    run_a, run_b = REPO / "reports/mini/grpo-pick", REPO / "reports/mini/base"
    rows = compare_runs(run_a, run_b, n_boot=200)
    res_a, res_b = load_results(run_a), load_results(run_b)
    assert {r["benchmark"] for r in rows} == {"mini-compbench", "mini-geneval", "mini-ocr", "mini-pick",
                                              "mini-quality"}
    assert len(rows) == len(res_a["metrics"]) == len(res_b["metrics"])
    for r in rows:
        key = f"{r['benchmark']}/{r['metric']}"
        assert abs(r["value_a"] - res_a["metrics"][key]) < 1e-9
        assert abs(r["value_b"] - res_b["metrics"][key]) < 1e-9
    combined = compare_combined(run_a, run_b, table_weights("table1")[1], n_boot=200)
    assert combined["diff"] == pytest.approx(combined["value_a"] - combined["value_b"])
    assert combined["ci_low"] <= combined["diff"] <= combined["ci_high"]


def test_replicate_runs_pool_their_images(tmp_path):
    # two seeds per side: the pooled point value is the mean over the seeds (same images per seed), the
    # difference the mean of the seeds' differences; the prompt bootstrap draws each prompt with all its images
    rng = np.random.default_rng(21)
    sides: dict[str, list[Path]] = {"a": [], "b": []}
    per_seed = []
    for s in range(2):
        g_b = rng.uniform(0.3, 0.7, size=(24, 2))
        g_a = np.clip(g_b + rng.normal(0.1 * (s + 1), 0.05, size=g_b.shape), 0, 1)
        o_b = rng.uniform(0, 1, size=(16, 2))
        o_a = o_b + (0.1 if s == 0 else -0.3)
        for side, (g, o) in (("a", (g_a, o_a)), ("b", (g_b, o_b))):
            frames = {"mini-geneval": (frame(g), "mean_of_tag_means", "tag"), "mini-ocr": (frame(o), "mean", "")}
            sides[side].append(write_run(tmp_path / f"{side}{s}", f"mini:{side}{s}", frames))
        per_seed.append(compare_runs(sides["a"][s], sides["b"][s], n_boot=50))
    rows = compare_runs(sides["a"], sides["b"], n_boot=400)
    assert [(r["benchmark"], r["metric"]) for r in rows] == [(r["benchmark"], r["metric"]) for r in per_seed[0]]
    for i, r in enumerate(rows):
        for key in ("value_a", "value_b", "diff"):
            assert r[key] == pytest.approx((per_seed[0][i][key] + per_seed[1][i][key]) / 2, abs=1e-12)
        assert r["n"] == per_seed[0][i]["n"] + per_seed[1][i]["n"]
    ocr = rows[-1]
    assert ocr["diff"] == pytest.approx(-0.1, abs=1e-12) and ocr["ci_low"] == pytest.approx(-0.1, abs=1e-12)
    combined = compare_combined(sides["a"], sides["b"], {"mini-geneval": 0.5, "mini-ocr": 0.5}, n_boot=50)
    assert combined["diff"] == pytest.approx(0.5 * rows[0]["diff"] + 0.5 * ocr["diff"], abs=1e-12)

    out = tmp_path / "cmp"
    arg_a, arg_b = (",".join(map(str, sides[k])) for k in "ab")
    assert main(["compare", arg_a, arg_b, "--n-boot", "400", "--out", str(out)]) == 0
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["checkpoint_a"] == "mini:a0 + mini:a1"
    assert float(table[-1]["diff"]) == pytest.approx(-0.1) and float(table[0]["diff"]) == pytest.approx(rows[0]["diff"])

    odd = write_run(tmp_path / "odd", "mini:odd", {"mini-ocr": (frame(rng.uniform(0, 1, size=(16, 2))), "mean", "")},
                    steps=20)
    with pytest.raises(ValueError, match=r"mini-ocr: generation\.steps is 10 in .*a0/results\.json but 20 in"):
        compare_runs([sides["a"][0], odd], sides["b"])
