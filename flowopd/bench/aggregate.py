"""Aggregation rules with bootstrap 95% intervals (pure functions on per-sample rows).

Rules: ``mean`` over all scored images; ``mean_of_tag_means`` (GenEval: the mean of the per-tag means);
``per_category`` (T2I-CompBench: one mean per category, headline = mean of the category means).
The bootstrap resamples *prompts* (all samples of a prompt move together: they share the prompt),
stratified by tag / category when the rule groups, so intervals respect the benchmark's design.
NaN scores mean "not applicable" and are excluded everywhere (and counted).
Every ``Metric`` records the bootstrap that made its interval (``n_boot`` draws, ``seed``), so a result can
be reproduced; tests/test_intervals.py checks by simulation that the intervals cover a known mean at their
level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

#: The two-sided level of every interval (percentile bootstrap).
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Metric:
    value: float
    ci_low: float
    ci_high: float
    stderr: float
    n: int  # scored (non-NaN) images
    n_boot: int = 0  # bootstrap draws behind ci_low / ci_high / stderr
    seed: int | None = None  # the bootstrap's seed, where the caller records it

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def per_prompt_sums(df: pd.DataFrame) -> pd.DataFrame:
    """Per prompt (``index``), the ``sum`` and ``count`` of its scored (non-NaN) samples: the unit the bootstrap
    resamples."""
    ok = df[~df["score"].isna()]
    return ok.groupby("index")["score"].agg(["sum", "count"])


def ratio_of_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The sample mean of resampled prompts, ``sum(sums) / sum(counts)`` along the last axis (NaN where no
    sample was scored)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.sum(-1) / counts.sum(-1)


def bootstrap_metric(value: float, boot: np.ndarray, n: int, seed: int | None = None) -> Metric:
    """A point value with the ``CI_LEVEL`` percentile interval (2.5 / 97.5) and the standard deviation of its
    bootstrap draws (NaN draws, from resamples where a stratum had no scored image, are left out)."""
    finite = boot[np.isfinite(boot)]
    if finite.size == 0:
        return Metric(value, np.nan, np.nan, np.nan, n, int(boot.size), seed)
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    stderr = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return Metric(value, float(lo), float(hi), stderr, n, int(boot.size), seed)


def aggregate(
    df: pd.DataFrame,
    rule: str = "mean",
    group_by: str = "",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Metric]:
    """Per-sample rows (columns ``index``, ``score``, and ``group_by``) -> ``{"mean": ..., group: ...}``.

    Each metric carries its ``CI_LEVEL`` bootstrap interval over prompts and records ``n_boot`` and ``seed``.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    if rule == "mean":
        strata = {"mean": df}
    elif rule in ("mean_of_tag_means", "per_category"):
        if group_by not in df.columns:
            raise ValueError(f"aggregation {rule!r} needs a {group_by!r} column in the per-sample rows")
        strata = {str(g): part for g, part in df.groupby(group_by, sort=True)}
    else:
        raise ValueError(f"unknown aggregation rule {rule!r}")

    values, boots, counts = {}, {}, {}
    for name, part in strata.items():
        per_prompt = per_prompt_sums(part)
        sums, cnts = per_prompt["sum"].to_numpy(), per_prompt["count"].to_numpy()
        counts[name] = int(cnts.sum())
        if len(sums) == 0:
            values[name], boots[name] = np.nan, np.full(n_boot, np.nan)
            continue
        values[name] = float(sums.sum() / cnts.sum())
        draw = rng.integers(0, len(sums), size=(n_boot, len(sums)))
        boots[name] = ratio_of_sums(sums[draw], cnts[draw])

    out: dict[str, Metric] = {}
    if rule == "mean":
        out["mean"] = bootstrap_metric(values["mean"], boots["mean"], counts["mean"], seed)
        return out
    names = sorted(strata)
    headline = float(np.nanmean([values[g] for g in names]))
    headline_boot = np.nanmean(np.stack([boots[g] for g in names]), axis=0)
    out["mean"] = bootstrap_metric(headline, headline_boot, sum(counts.values()), seed)
    for g in names:
        out[g] = bootstrap_metric(values[g], boots[g], counts[g], seed)
    return out
