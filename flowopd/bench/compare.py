"""Paired comparison of two evaluated checkpoints: A - B with a paired prompt-bootstrap 95% interval.

Why paired: two runs evaluated with the same spec draw the same prompts with the same seed for every
(index, sample), so most of the spread between prompts (an easy prompt is easy for both checkpoints) is
shared. The unpaired intervals of ``aggregate`` carry that prompt-difficulty variance in full; the
difference of the two runs on the *same* bootstrap draw of prompts cancels it, and what is left is the
variance of the per-prompt differences - usually far smaller, so real but small gains become visible.

Each bootstrap draw resamples prompt indices once (stratified by the spec's group column for the
grouped rules, as ``aggregate`` does) and applies that draw to both runs; the rule (``mean``,
``mean_of_tag_means``, ``per_category``) is evaluated on A and on B and the draw contributes their
difference. An image whose score is NaN ("not applicable") in either run drops the pair, so both sides
average the same images; with no such one-sided NaN the point values are exactly ``aggregate``'s.

Replicates: a side may be several runs of one recipe (training seeds), given as a list (``compare A1,A2
B1,B2`` on the command line; :func:`pool_replicates`). Their images are pooled as more samples of the same
prompts (replicate ``i``'s sample ``j`` becomes sample ``i * REPLICATE_STRIDE + j``), so the point value is
the mean over the replicates (they score the same number of images) and the prompt bootstrap, drawing each
prompt with all its replicates' images, measures the seed-averaged difference on this prompt set. The
interval is over prompts, not over seeds: with few seeds it does not cover the spread between training runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowopd.bench.aggregate import Metric, bootstrap_metric, per_prompt_sums, ratio_of_sums
from flowopd.bench.results import load_results
from flowopd.bench.spec import get_spec

GROUPED_RULES = ("mean_of_tag_means", "per_category")
# what a paired comparison needs to agree between the two runs: the same prompts, seeds and scorer
SAME_FIELDS = ("aggregation", "scorer", "scorer_version", "limit")
KEY = ["index", "sample"]
#: Replicate i's sample j is pooled as sample i * REPLICATE_STRIDE + j (see the module docstring).
REPLICATE_STRIDE = 1_000_000


def _examples(pairs: set[tuple[int, int]], k: int = 3) -> str:
    shown = ", ".join(str(p) for p in sorted(pairs)[:k])
    return shown + (", ..." if len(pairs) > k else "")


def _check_pairs(df_a: pd.DataFrame, df_b: pd.DataFrame, group_by: str, label: str) -> None:
    """Both frames hold the same (index, sample) pairs once each, with the same prompt (and group) per row."""
    for side, df in (("A", df_a), ("B", df_b)):
        missing = [c for c in (*KEY, "score") if c not in df.columns]
        if missing:
            raise ValueError(f"{label}: run {side}'s per-sample rows lack column(s) {missing}")
        dup = df.duplicated(KEY)
        if dup.any():
            pairs = set(map(tuple, df.loc[dup, KEY].to_numpy().tolist()))
            raise ValueError(f"{label}: run {side} holds (index, sample) pair(s) {_examples(pairs)} more than once")
    keys_a = set(map(tuple, df_a[KEY].to_numpy().tolist()))
    keys_b = set(map(tuple, df_b[KEY].to_numpy().tolist()))
    if keys_a != keys_b:
        only_a, only_b = keys_a - keys_b, keys_b - keys_a
        raise ValueError(
            f"{label}: the runs hold different (index, sample) pairs - {len(only_a)} only in A"
            f"{' (' + _examples(only_a) + ')' if only_a else ''}, {len(only_b)} only in B"
            f"{' (' + _examples(only_b) + ')' if only_b else ''}; a paired comparison needs the same prompts "
            "and samples (evaluate both with the same spec and --limit)"
        )
    columns = [c for c in ("prompt", group_by) if c and c in df_a.columns and c in df_b.columns]
    if not columns:
        return
    both = df_a[KEY + columns].merge(df_b[KEY + columns], on=KEY, suffixes=("_a", "_b"))
    for column in columns:
        a, b = both[f"{column}_a"], both[f"{column}_b"]
        differ = ~((a == b).fillna(False) | (a.isna() & b.isna()))
        if differ.any():
            row = both[differ].iloc[0]
            raise ValueError(
                f"{label}: prompt index {int(row['index'])} has {column} {row[f'{column}_a']!r} in run A but "
                f"{row[f'{column}_b']!r} in run B ({int(differ.sum())} rows differ); the runs were not "
                "evaluated on the same prompt set"
            )


def _scored_in_both(df: pd.DataFrame, other: pd.DataFrame) -> pd.Series:
    """Rows of ``df`` (in its own order) whose score is finite in ``df`` and in ``other`` at the same pair."""
    other_score = other.set_index(KEY)["score"].reindex(pd.MultiIndex.from_frame(df[KEY])).to_numpy()
    return df["score"].notna() & ~pd.isna(other_score)


def _strata(df: pd.DataFrame, keep: pd.Series, rule: str, group_by: str) -> dict[str, pd.DataFrame]:
    """``aggregate``'s strata (groups taken before the NaN drop, so an all-NaN group keeps its key)."""
    if rule == "mean":
        return {"mean": df[keep]}
    if rule not in GROUPED_RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}")
    if group_by not in df.columns:
        raise ValueError(f"aggregation {rule!r} needs a {group_by!r} column in the per-sample rows")
    return {str(g): part[keep.loc[part.index]] for g, part in df.groupby(group_by, sort=True)}


def _paired(
    df_a: pd.DataFrame, df_b: pd.DataFrame, rule: str, group_by: str, n_boot: int, seed: int, label: str
) -> tuple[dict[str, float], dict[str, float], dict[str, Metric]]:
    """Point values of A and B on the images scored in both, and the paired bootstrap of A - B."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    _check_pairs(df_a, df_b, group_by if rule in GROUPED_RULES else "", label)
    a = df_a.reset_index(drop=True)
    b = df_b.reset_index(drop=True)
    strata_a = _strata(a, _scored_in_both(a, b), rule, group_by)
    strata_b = _strata(b, _scored_in_both(b, a), rule, group_by)
    rng = np.random.default_rng(seed)

    values_a, values_b, boots_a, boots_b, counts = {}, {}, {}, {}, {}
    for name in strata_a:
        # each side is summed in its own row order, so its point value is bit-identical to aggregate()'s
        pa, pb = per_prompt_sums(strata_a[name]), per_prompt_sums(strata_b[name])
        sums_a, sums_b = pa["sum"].to_numpy(), pb["sum"].to_numpy()
        cnts = pa["count"].to_numpy()  # the same prompts and counts on both sides after the paired drop
        counts[name] = int(cnts.sum())
        if len(cnts) == 0:
            values_a[name] = values_b[name] = math.nan
            boots_a[name] = boots_b[name] = np.full(n_boot, np.nan)
            continue
        values_a[name] = float(sums_a.sum() / cnts.sum())
        values_b[name] = float(sums_b.sum() / cnts.sum())
        draw = rng.integers(0, len(cnts), size=(n_boot, len(cnts)))  # one draw of prompts for both runs
        boots_a[name] = ratio_of_sums(sums_a[draw], cnts[draw])
        boots_b[name] = ratio_of_sums(sums_b[draw], cnts[draw])

    if rule == "mean":
        diff = {"mean": bootstrap_metric(values_a["mean"] - values_b["mean"], boots_a["mean"] - boots_b["mean"],
                                counts["mean"])}
        return values_a, values_b, diff
    names = sorted(strata_a)
    head_a = float(np.nanmean([values_a[g] for g in names]))
    head_b = float(np.nanmean([values_b[g] for g in names]))
    boot_head = (np.nanmean(np.stack([boots_a[g] for g in names]), axis=0)
                 - np.nanmean(np.stack([boots_b[g] for g in names]), axis=0))
    diff = {"mean": bootstrap_metric(head_a - head_b, boot_head, sum(counts.values()))}
    for g in names:
        diff[g] = bootstrap_metric(values_a[g] - values_b[g], boots_a[g] - boots_b[g], counts[g])
    return {"mean": head_a, **values_a}, {"mean": head_b, **values_b}, diff


def paired_difference(
    df_a: pd.DataFrame,
    df_b: pd.DataFrame,
    rule: str = "mean",
    group_by: str = "",
    n_boot: int = 2000,
    seed: int = 0,
    label: str = "per-sample rows",
) -> dict[str, Metric]:
    """A - B under an aggregation rule, with a paired prompt-bootstrap 95% interval.

    ``df_a`` and ``df_b`` are two runs' per-sample rows (``index``, ``sample``, ``score``, ``prompt`` and
    the ``group_by`` column for the grouped rules), paired on (index, sample). Each draw resamples prompts
    once for both runs, so prompt difficulty, shared by the two, drops out of the interval. Returns
    ``{"mean": ..., group: ...}`` like ``aggregate``; ``n`` counts the pairs scored in both runs.
    Raises ValueError (naming ``label``) when the runs hold different pairs or different prompts.
    """
    return _paired(df_a, df_b, rule, group_by, n_boot, seed, label)[2]


def _check_same(name: str, entry_a: dict[str, Any], entry_b: dict[str, Any], path_a: str, path_b: str) -> None:
    gen_a, gen_b = entry_a.get("generation"), entry_b.get("generation")
    differing: list[tuple[str, Any, Any]] = []
    if isinstance(gen_a, dict) and isinstance(gen_b, dict):
        differing += [(f"generation.{k}", gen_a.get(k), gen_b.get(k))
                      for k in sorted(set(gen_a) | set(gen_b)) if gen_a.get(k) != gen_b.get(k)]
    elif gen_a != gen_b:
        differing.append(("generation", gen_a, gen_b))
    differing += [(f, entry_a.get(f), entry_b.get(f)) for f in SAME_FIELDS if entry_a.get(f) != entry_b.get(f)]
    if differing:
        field, va, vb = differing[0]
        more = f" (and {', '.join(d[0] for d in differing[1:])})" if len(differing) > 1 else ""
        raise ValueError(
            f"{name}: {field} is {va!r} in {path_a} but {vb!r} in {path_b}{more}; a paired comparison needs "
            "the same prompts, seeds and scorer (re-evaluate one run with the other's settings)"
        )


def _scores(results: dict[str, Any], name: str) -> pd.DataFrame:
    frames = []
    for i, results_path in enumerate(results.get("_replicates") or [results["_path"]]):
        path = Path(results_path).parent / "scores" / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no per-sample scores for {name!r} (re-run `python -m flowopd.bench "
                                    "evaluate` on this run to write them)")
        frame = pd.read_parquet(path)
        if i:
            frame = frame.assign(sample=frame["sample"] + i * REPLICATE_STRIDE)
        frames.append(frame)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def pool_replicates(runs: Sequence[str | Path | dict[str, Any]]) -> dict[str, Any]:
    """Several evaluated runs of one recipe (e.g. training seeds) as one side of a comparison.

    Returns a results dict whose per-sample scores are the replicates' pooled (module docstring), holding
    the benchmarks every replicate has. One run is returned as it is. Raises ValueError when the replicates
    were evaluated with different generation settings, scorer or prompt limit.
    """
    loaded = [r if isinstance(r, dict) else load_results(r) for r in runs]
    if not loaded:
        raise ValueError("pool_replicates: no runs")
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0]
    names = [n for n in first["benchmarks"] if all(n in r["benchmarks"] for r in loaded[1:])]
    if not names:
        raise ValueError(f"the replicates {', '.join(r['_path'] for r in loaded)} have no benchmark in common")
    for other in loaded[1:]:
        for name in names:
            _check_same(name, first["benchmarks"][name], other["benchmarks"][name], first["_path"], other["_path"])
    return {**first, "benchmarks": {n: first["benchmarks"][n] for n in names},
            "checkpoint": " + ".join(str(r["checkpoint"]) for r in loaded),
            "_path": first["_path"], "_replicates": [r["_path"] for r in loaded]}


def _side(run: str | Path | dict[str, Any] | Sequence[str | Path | dict[str, Any]]) -> dict[str, Any]:
    if isinstance(run, dict):
        return run
    if isinstance(run, (str, Path)):
        return load_results(run)
    return pool_replicates(run)


def _require_benchmarks(res_a: dict[str, Any], res_b: dict[str, Any], names: Iterable[str], why: str = "") -> None:
    """ValueError naming the first benchmark of ``names`` that run A or B has no results for."""
    for name in names:
        for side, res in (("A", res_a), ("B", res_b)):
            if name not in res["benchmarks"]:
                raise ValueError(f"run {side} ({res['_path']}) has no results for benchmark {name!r}{why} "
                                 f"(it has: {', '.join(sorted(res['benchmarks'])) or 'none'})")


RunArg = str | Path | dict[str, Any] | Sequence[str | Path | dict[str, Any]]


#: seed of every paired bootstrap of ``compare`` (recorded in compare.md and compare.csv)
BOOT_SEED = 0


def compare_runs(
    run_a: RunArg,
    run_b: RunArg,
    benchmarks: Sequence[str] | None = None,
    n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """Paired comparison of two runs (directories or results.json; a list pools replicates) on the
    benchmarks both hold.

    Returns one row per benchmark metric: ``benchmark, metric, value_a, value_b, diff, ci_low, ci_high,
    stderr, n, significant`` (the paired 95% interval excludes 0). Raises ValueError when a requested
    benchmark is missing from a run, or when the runs' generation settings, scorer, scorer version or
    prompt limit differ (the pairing would be meaningless).
    """
    res_a, res_b = _side(run_a), _side(run_b)
    path_a, path_b = res_a["_path"], res_b["_path"]
    if benchmarks:
        names = list(benchmarks)
        _require_benchmarks(res_a, res_b, names)
    else:
        names = sorted(set(res_a["benchmarks"]) & set(res_b["benchmarks"]))
        if not names:
            raise ValueError(f"{path_a} and {path_b} have no benchmark in common")

    rows: list[dict[str, Any]] = []
    for name in names:
        entry_a, entry_b = res_a["benchmarks"][name], res_b["benchmarks"][name]
        _check_same(name, entry_a, entry_b, path_a, path_b)
        rule = entry_a["aggregation"]
        group_by = get_spec(name).group_by if rule in GROUPED_RULES else ""
        values_a, values_b, diff = _paired(_scores(res_a, name), _scores(res_b, name), rule, group_by,
                                           n_boot, BOOT_SEED, name)
        for metric, m in diff.items():
            significant = bool(m.ci_low > 0 or m.ci_high < 0)  # False for NaN bounds
            rows.append({"benchmark": name, "metric": metric, "value_a": values_a[metric],
                         "value_b": values_b[metric], "diff": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high,
                         "stderr": m.stderr, "n": m.n, "significant": significant, "n_boot": n_boot,
                         "seed": BOOT_SEED})
    return rows


def table_weights(table: str, scale: str = "mini") -> tuple[str, dict[str, float]]:
    """A table's combined column (Table 1's Average) as ``(label, {benchmark: weight})`` at ``scale``."""
    from flowopd.bench.report import load_table

    columns = load_table(table)["columns"]
    metrics = {c["label"]: c.get("metric", {}).get(scale) for c in columns}
    for column in columns:
        combine = column.get("combine", {}).get(scale)
        if not combine:
            continue
        weights: dict[str, float] = {}
        for label, weight in combine.items():
            bench, _, metric = (metrics.get(label) or "").partition("/")
            if metric != "mean":
                raise ValueError(f"table {table!r}: column {column['label']!r} combines {label!r}, which is not a "
                                 f"benchmark's mean at scale {scale!r}")
            weights[bench] = float(weight)
        return column["label"], weights
    raise ValueError(f"table {table!r} has no combined column (like Table 1's Average) at scale {scale!r}")


def _pool_arrays(
    df_a: pd.DataFrame, df_b: pd.DataFrame, prompts: np.ndarray, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt score sums of A and B and the shared counts over the pairs scored in both, in ``prompts`` order."""
    a, b = df_a.reset_index(drop=True), df_b.reset_index(drop=True)
    keep_a, keep_b = _scored_in_both(a, b), _scored_in_both(b, a)
    pa, pb = per_prompt_sums(a[keep_a]).reindex(prompts), per_prompt_sums(b[keep_b]).reindex(prompts)
    if not np.array_equal(pa["count"].fillna(0).to_numpy(), pb["count"].fillna(0).to_numpy()):
        raise ValueError(f"{label}: the runs scored different images per prompt")
    return (pa["sum"].fillna(0).to_numpy(), pb["sum"].fillna(0).to_numpy(), pa["count"].fillna(0).to_numpy())


def compare_combined(
    run_a: RunArg,
    run_b: RunArg,
    weights: dict[str, float],
    label: str = "combined",
    n_boot: int = 2000,
    seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """A - B of a weighted sum of benchmark means (Table 1's Average), with a paired 95% interval.

    The benchmarks are resampled *jointly*: those that score the same images (``images_from``, e.g.
    mini-quality and mini-pick on mini-geneval's images) share one draw of prompts per bootstrap draw
    (stratified by the group column of a grouped benchmark among them, as ``compare`` does), and separate
    prompt sets are drawn independently; each draw evaluates every benchmark's rule on A and on B. So the
    interval accounts for the correlation between benchmarks measured on the same images. The point values
    equal the weighted sums of ``compare_runs``' values. Returns one row like ``compare_runs``' rows.
    """
    res_a, res_b = _side(run_a), _side(run_b)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    pools: dict[str, list[str]] = {}
    _require_benchmarks(res_a, res_b, weights, f", which {label!r} combines")
    for name in weights:
        _check_same(name, res_a["benchmarks"][name], res_b["benchmarks"][name], res_a["_path"], res_b["_path"])
        pools.setdefault(get_spec(name).images_from or name, []).append(name)

    rng = np.random.default_rng(seed)
    point_a = point_b = 0.0
    boot_a, boot_b = np.zeros(n_boot), np.zeros(n_boot)
    n_prompts = 0
    for members in pools.values():
        frames = {m: (_scores(res_a, m), _scores(res_b, m)) for m in members}
        rules = {m: res_a["benchmarks"][m]["aggregation"] for m in members}
        grouped = [m for m in members if rules[m] in GROUPED_RULES]
        group_by = {get_spec(m).group_by for m in grouped}
        if len(group_by) > 1:
            raise ValueError(f"{', '.join(members)} share images but group by different columns {sorted(group_by)}")
        first = frames[members[0]][0]
        prompts = np.sort(first["index"].unique())
        if group_by:
            column = group_by.pop()
            owner = frames[grouped[0]][0].drop_duplicates("index").set_index("index")[column].reindex(prompts)
            strata = [np.flatnonzero((owner == g).to_numpy()) for g in sorted(owner.dropna().unique())]
        else:
            strata = [np.arange(len(prompts))]
        draws = [pos[rng.integers(0, len(pos), size=(n_boot, len(pos)))] for pos in strata]
        n_prompts += len(prompts)
        for m in members:
            df_a, df_b = frames[m]
            _check_pairs(df_a, df_b, get_spec(m).group_by if m in grouped else "", m)
            sa, sb, cnt = _pool_arrays(df_a, df_b, prompts, m)
            if m in grouped:
                va = float(np.nanmean([ratio_of_sums(sa[p], cnt[p]) for p in strata]))
                vb = float(np.nanmean([ratio_of_sums(sb[p], cnt[p]) for p in strata]))
                with np.errstate(invalid="ignore"):
                    ba = np.nanmean(np.stack([ratio_of_sums(sa[d], cnt[d]) for d in draws]), axis=0)
                    bb = np.nanmean(np.stack([ratio_of_sums(sb[d], cnt[d]) for d in draws]), axis=0)
            else:
                whole = np.concatenate(draws, axis=1)
                va, vb = float(ratio_of_sums(sa, cnt)), float(ratio_of_sums(sb, cnt))
                ba, bb = ratio_of_sums(sa[whole], cnt[whole]), ratio_of_sums(sb[whole], cnt[whole])
            w = weights[m]
            point_a, point_b = point_a + w * va, point_b + w * vb
            boot_a, boot_b = boot_a + w * ba, boot_b + w * bb
    diff = bootstrap_metric(point_a - point_b, boot_a - boot_b, n_prompts)
    return {"benchmark": label, "metric": "combined", "value_a": point_a, "value_b": point_b, "diff": diff.value,
            "ci_low": diff.ci_low, "ci_high": diff.ci_high, "stderr": diff.stderr, "n": diff.n,
            "significant": bool(diff.ci_low > 0 or diff.ci_high < 0), "n_boot": n_boot, "seed": seed}


def _fmt(value: float, signed: bool = False, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    value = round(value, digits) + 0.0  # no "-0.000" for a difference that rounds to zero
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_difference(diff: float, ci_low: float, ci_high: float, digits: int = 3) -> str:
    """``+0.012 [+0.003, +0.022]*``: a paired difference with its 95% interval, ``*`` where it excludes 0
    (the cell the reports' tables write for a row of :func:`compare_runs` or any such interval)."""
    star = "*" if ci_low > 0 or ci_high < 0 else ""
    return (f"{_fmt(diff, True, digits)} [{_fmt(ci_low, True, digits)}, {_fmt(ci_high, True, digits)}]"
            f"{star}")


def mean_difference(run_a: RunArg, run_b: RunArg, benchmark: str, digits: int = 3) -> str:
    """:func:`format_difference` of the ``mean`` row of ``compare_runs(run_a, run_b, [benchmark])``."""
    row = next(r for r in compare_runs(run_a, run_b, [benchmark]) if r["metric"] == "mean")
    return format_difference(row["diff"], row["ci_low"], row["ci_high"], digits)


def markdown_comparison(rows: Sequence[dict[str, Any]], name_a: str, name_b: str, n_boot: int = 2000) -> str:
    """The table ``compare`` prints: one line per benchmark metric, ``*`` where the interval excludes 0."""
    lines = [
        f"A: {name_a}  vs  B: {name_b} (paired prompt bootstrap, {n_boot} draws, seed {BOOT_SEED}; * = the 95% "
        f"interval excludes 0)",
        "",
        f"| benchmark | metric | A: {name_a} | B: {name_b} | A - B [95% paired CI] | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"[{_fmt(r['ci_low'], True)}, {_fmt(r['ci_high'], True)}]" if not math.isnan(r["ci_low"]) else ""
        lines.append(f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value_a'])} | {_fmt(r['value_b'])} | "
                     f"{_fmt(r['diff'], True)} {ci} | {'*' if r['significant'] else ''} |")
    return "\n".join(lines)


def write_comparison(
    rows: Sequence[dict[str, Any]], name_a: str, name_b: str, out: str | Path, n_boot: int = 2000
) -> dict[str, Path]:
    """``compare.md`` (the printed table) and ``compare.csv`` (every row, with both checkpoints' names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / "compare.md", out / "compare.csv"
    md.write_text(markdown_comparison(rows, name_a, name_b, n_boot) + "\n")
    frame = pd.DataFrame(list(rows))
    frame.insert(0, "checkpoint_b", name_b)
    frame.insert(0, "checkpoint_a", name_a)
    frame.to_csv(csv, index=False)
    return {"md": md, "csv": csv}
