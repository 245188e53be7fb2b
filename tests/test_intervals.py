"""The 95% intervals are what they say: simulated data sets with a known truth, and the resampler's reach.

Every table prints ``aggregate``'s prompt-bootstrap intervals and ``compare`` prints paired ones. Here
synthetic per-prompt scores with a known mean are drawn many times; each interval type (single run, per
category and its headline, paired difference, pooled replicates) must cover the truth in close to 95% of the
data sets. With 400 data sets the coverage of a true 95% interval has a standard deviation of 0.011, so the
band [0.91, 0.98] is about -3.6 / +2.7 standard deviations wide; all 2,000 intervals together (sd 0.005)
must lie in [0.935, 0.965], which a 90% interval under the 95% label (coverage ~0.90) cannot reach.
A second check reads the level straight off each interval: for a near-normal bootstrap distribution the
95% percentile interval is 2 x 1.96 bootstrap standard errors wide (a 90% one: 2 x 1.645).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowopd.bench.aggregate import CI_LEVEL, aggregate
from flowopd.bench.compare import REPLICATE_STRIDE, paired_difference

N_SETS = 400
N_PROMPTS = 100  # per data set (per category): near the large-sample regime, see the module docstring
N_BOOT = 500  # the percentile level does not depend on the number of draws; fewer draws keep the test fast
BAND = (0.91, 0.98)


def _frame(scores: np.ndarray, groups: np.ndarray | None = None) -> pd.DataFrame:
    """(n_prompts, n_samples) scores -> per-sample rows (index, sample, score[, tag]) as evaluate writes them."""
    n, k = scores.shape
    df = pd.DataFrame({"index": np.repeat(np.arange(n), k), "sample": np.tile(np.arange(k), n),
                       "score": scores.ravel(), "prompt": np.repeat([f"p{i}" for i in range(n)], k)})
    if groups is not None:
        df["tag"] = np.repeat(groups, k)
    return df


def _covers(metric, truth: float) -> bool:
    return bool(metric.ci_low <= truth <= metric.ci_high)


def _single_run_coverage(rng: np.random.Generator) -> list[bool]:
    # GenEval-like: per-prompt difficulty p ~ Beta(2, 1.5), 4 binary images per prompt, ~5% not applicable
    truth, hits = 2 / 3.5, []
    for s in range(N_SETS):
        p = rng.beta(2.0, 1.5, size=N_PROMPTS)
        scores = (rng.random((N_PROMPTS, 4)) < p[:, None]).astype(float)
        scores[rng.random(scores.shape) < 0.05] = np.nan
        hits.append(_covers(aggregate(_frame(scores), "mean", n_boot=N_BOOT, seed=s)["mean"], truth))
    return hits


def _per_category_coverage(rng: np.random.Generator) -> list[bool]:
    # three categories with different means; the headline is the mean of the category means
    means, hits = np.array([0.2, 0.5, 0.7]), []
    groups = np.repeat(["a", "b", "c"], N_PROMPTS)
    for s in range(N_SETS):
        prompt_effect = np.repeat(means, N_PROMPTS) + rng.normal(0, 0.15, size=3 * N_PROMPTS)
        scores = prompt_effect[:, None] + rng.normal(0, 0.2, size=(3 * N_PROMPTS, 2))
        metrics = aggregate(_frame(scores, groups), "per_category", "tag", n_boot=N_BOOT, seed=s)
        hits.append(_covers(metrics["mean"], means.mean()))
        hits += [_covers(metrics[g], m) for g, m in zip("abc", means)]
    return hits


def _as_categories(sets: list[np.ndarray]) -> pd.DataFrame:
    """Many data sets in one frame, each its own category: the stratified bootstrap resamples each alone, so
    category j's interval is exactly data set j's (one call instead of N_SETS keeps the test fast)."""
    frames = []
    for j, x in enumerate(sets):
        frame = _frame(x, np.full(len(x), f"set{j:04d}"))
        frames.append(frame.assign(index=frame["index"] + j * len(x)))
    return pd.concat(frames, ignore_index=True)


def _paired_coverage(rng: np.random.Generator) -> list[bool]:
    # a large prompt difficulty shared by A and B, a small per-prompt effect of A's own, known mean difference
    delta, side_a, side_b = 0.05, [], []
    for _ in range(N_SETS):
        difficulty = rng.normal(0, 1.0, size=(N_PROMPTS, 1))
        own = rng.normal(0, 0.1, size=(N_PROMPTS, 1))
        side_a.append(difficulty + delta + own + rng.normal(0, 0.1, size=(N_PROMPTS, 2)))
        side_b.append(difficulty + rng.normal(0, 0.1, size=(N_PROMPTS, 2)))
    diff = paired_difference(_as_categories(side_a), _as_categories(side_b), "per_category", "tag",
                             n_boot=N_BOOT, seed=0)
    return [_covers(m, delta) for name, m in diff.items() if name != "mean"]


def _pooled(runs: list[np.ndarray]) -> pd.DataFrame:
    """Replicate runs pooled as ``compare`` pools them: replicate i's sample j is sample i * STRIDE + j."""
    frames = [_as_categories(r).assign(sample=lambda f, i=i: f["sample"] + i * REPLICATE_STRIDE)
              for i, r in enumerate(runs)]
    return pd.concat(frames, ignore_index=True)


def _pooled_replicates_coverage(rng: np.random.Generator) -> list[bool]:
    # two training seeds per side, each shifting its whole run; the pooled interval is over prompts, so its
    # truth is the seed-averaged difference given these seeds (compare.py's docstring), not the recipe's mean
    delta, runs_a, runs_b, truths = 0.05, [[], []], [[], []], []
    for _ in range(N_SETS):
        difficulty = rng.normal(0, 1.0, size=(N_PROMPTS, 1))
        own = rng.normal(0, 0.1, size=(N_PROMPTS, 1))
        shift_a, shift_b = rng.normal(0, 0.02, size=2), rng.normal(0, 0.02, size=2)
        for r in range(2):
            runs_a[r].append(difficulty + delta + own + shift_a[r] + rng.normal(0, 0.1, size=(N_PROMPTS, 2)))
            runs_b[r].append(difficulty + shift_b[r] + rng.normal(0, 0.1, size=(N_PROMPTS, 2)))
        truths.append(delta + shift_a.mean() - shift_b.mean())
    diff = paired_difference(_pooled(runs_a), _pooled(runs_b), "per_category", "tag", n_boot=N_BOOT, seed=0)
    return [_covers(diff[f"set{j:04d}"], truth) for j, truth in enumerate(truths)]


SIMULATIONS = {
    "single-run": _single_run_coverage,
    "per-category": _per_category_coverage,
    "paired": _paired_coverage,
    "pooled-replicates": _pooled_replicates_coverage,
}


@pytest.fixture(scope="module")
def coverage() -> dict[str, float]:
    return {name: float(np.mean(sim(np.random.default_rng(i)))) for i, (name, sim) in enumerate(SIMULATIONS.items())}


@pytest.mark.parametrize("name", list(SIMULATIONS))
def test_each_interval_covers_the_known_mean_at_95_percent(coverage, name):
    assert BAND[0] <= coverage[name] <= BAND[1], f"{name}: coverage {coverage[name]:.3f} outside {BAND}"


def test_all_intervals_together_cover_at_95_percent(coverage):
    # the four simulations' coverages averaged: 1,600 data sets' worth of intervals (sd ~0.005)
    pooled = float(np.mean(list(coverage.values())))
    assert 0.93 <= pooled <= 0.965, coverage


def test_the_interval_width_is_the_95_percent_one():
    # near-normal bootstrap distributions (400 prompts): width / (2 * bootstrap stderr) = z_0.975 = 1.96
    rng = np.random.default_rng(7)
    ratios = []
    for s in range(20):
        m = aggregate(_frame(rng.normal(size=(400, 1))), "mean", n_boot=4000, seed=s)["mean"]
        ratios.append((m.ci_high - m.ci_low) / (2 * m.stderr))
    assert CI_LEVEL == 0.95
    assert 1.90 <= float(np.mean(ratios)) <= 2.02, ratios


def _lone_prompt(n: int, k: int) -> np.ndarray:
    scores = np.zeros((n, 2))
    scores[k] = 1.0
    return scores


@pytest.mark.parametrize("k", range(5))
def test_every_prompt_can_be_drawn_by_the_single_run_resampler(k):
    # only prompt k scores 1: its draws alone lift the upper bound above 0 (and give a non-zero stderr);
    # a resample misses it with probability (4/5)^5 = 0.33, so the 97.5th percentile needs it drawn
    m = aggregate(_frame(_lone_prompt(5, k)), "mean", n_boot=1000, seed=0)["mean"]
    assert m.value == pytest.approx(0.2)
    assert m.ci_low == 0.0 and m.ci_high >= 0.4 and m.stderr > 0.1, (k, m)


@pytest.mark.parametrize("k", [0, 4, 5, 9])
def test_every_prompt_of_each_category_can_be_drawn(k):
    # two categories of 5 prompts; prompts 4 and 9 are the last of their stratum
    groups = np.repeat(["a", "b"], 5)
    metrics = aggregate(_frame(_lone_prompt(10, k), groups), "per_category", "tag", n_boot=1000, seed=0)
    own = metrics["a" if k < 5 else "b"]
    assert own.ci_high >= 0.4 and own.stderr > 0.1, (k, own)
    assert metrics["mean"].ci_high >= 0.2, (k, metrics["mean"])


@pytest.mark.parametrize("k", [0, 2, 4])
def test_every_prompt_can_be_drawn_by_the_paired_resampler(k):
    a = _lone_prompt(5, k)
    diff = paired_difference(_frame(a), _frame(np.zeros((5, 2))), "mean", n_boot=1000, seed=0)["mean"]
    assert diff.value == pytest.approx(0.2) and diff.ci_high >= 0.4 and diff.stderr > 0.1, (k, diff)


def test_the_bootstrap_seed_and_draws_are_recorded_and_reproduce_the_interval():
    df = _frame(np.random.default_rng(0).normal(size=(30, 2)))
    first = aggregate(df, "mean", n_boot=300, seed=11)["mean"].to_dict()
    assert first["seed"] == 11 and first["n_boot"] == 300
    again = aggregate(df, "mean", n_boot=first["n_boot"], seed=first["seed"])["mean"].to_dict()
    assert again == first
    other = aggregate(df, "mean", n_boot=300, seed=12)["mean"].to_dict()
    assert other["ci_low"] != first["ci_low"] and other["value"] == first["value"]
    grouped = aggregate(_frame(np.ones((4, 1)), np.array(["a", "a", "b", "b"])), "mean_of_tag_means", "tag",
                        n_boot=50, seed=3)
    assert {(m.seed, m.n_boot) for m in grouped.values()} == {(3, 50)}


def test_too_few_bootstrap_draws_are_refused():
    with pytest.raises(ValueError, match="n_boot must be at least 2, got 1"):
        aggregate(_frame(np.ones((3, 1))), "mean", n_boot=1)


def test_compare_records_its_bootstrap_draws_and_seed(tmp_path):
    """compare.md names the draws and the seed, and every compare.csv row carries them (issue 19, point 8)."""
    import pandas as pd

    from flowopd.bench.compare import BOOT_SEED, compare_runs, write_comparison

    repo = Path(__file__).resolve().parents[1]
    rows = compare_runs(repo / "reports/mini/grpo-pick", repo / "reports/mini/base", ["mini-pick"], n_boot=300)
    assert rows and all((r["n_boot"], r["seed"]) == (300, BOOT_SEED) for r in rows)
    paths = write_comparison(rows, "a", "b", tmp_path, n_boot=300)
    assert f"300 draws, seed {BOOT_SEED}" in paths["md"].read_text()
    frame = pd.read_csv(paths["csv"])
    assert (frame["seed"] == BOOT_SEED).all() and (frame["n_boot"] == 300).all()
