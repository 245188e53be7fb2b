"""Reports: markdown, CSV and an HTML page with sample grids, from one or more runs' results.json.

With a table definition (``reports/tables/<name>.toml``) rows are the table's runs, columns its
metrics, and the paper's numbers sit beside ours.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.bench.results import load_results
from flowopd.scorers.engine import is_official

#: Appended to a cell scored by a non-official engine (a port, a substitute, an injected model).
NON_OFFICIAL_MARK = "†"
NON_OFFICIAL_NOTE = (
    f"{NON_OFFICIAL_MARK} scored by a non-official engine (a port or a substitute of the official scorer): "
    "compare with published numbers only with docs/scorers/parity.md at hand."
)


def table_dirs() -> list[Path]:
    pkg = Path(__file__).resolve().parents[1]
    return [d for d in (pkg / "_data" / "tables", pkg.parent / "reports" / "tables") if d.is_dir()]


def load_table(name: str) -> dict[str, Any]:
    for d in table_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return tomllib.loads(path.read_text())
    known = sorted({p.stem for d in table_dirs() for p in d.glob("*.toml")})
    raise KeyError(f"unknown table {name!r} (known: {', '.join(known) or 'none'})")


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def metric_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if math.isnan(entry["ci_low"]):
        return fmt(entry["value"])
    return f"{fmt(entry['value'])} [{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}]"


def results_frame(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long form: run, benchmark, metric, value, ci_low, ci_high, stderr, n."""
    rows = []
    for res in runs:
        for bench, entry in res["benchmarks"].items():
            for name, m in entry["metrics"].items():
                rows.append({"run": res["checkpoint"], "benchmark": bench, "metric": f"{bench}/{name}", **m})
    return pd.DataFrame(rows)


def non_official(res: dict[str, Any] | None, bench: str) -> bool:
    """True when ``bench`` of a run was scored by an engine labelled non-official (or unknown) in results.json."""
    if res is None or bench not in res["benchmarks"]:
        return False
    entry = res["benchmarks"][bench]
    return "engine" in entry and is_official(entry) is not True


def markdown_summary(results: dict[str, Any]) -> str:
    """The table ``evaluate`` prints: one line per benchmark metric."""
    lines = [
        f"checkpoint: {results['checkpoint']}",
        "",
        "| benchmark | metric | value | 95% CI | images |",
        "|---|---|---|---|---|",
    ]
    marked = False
    for bench, entry in sorted(results["benchmarks"].items()):
        mark = NON_OFFICIAL_MARK if non_official(results, bench) else ""
        marked = marked or bool(mark)
        for name, m in entry["metrics"].items():
            lines.append(
                f"| {bench} | {name} | {fmt(m['value'])}{mark} | [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}] | {m['n']} |"
            )
    if marked:
        lines += ["", NON_OFFICIAL_NOTE]
    return "\n".join(lines)


def _table_rows(runs: Sequence[dict[str, Any]], table: dict[str, Any] | None, scale: str) -> list[list[str]]:
    if table is None:
        metrics = sorted({f"{b}/mean" for r in runs for b in r["benchmarks"]})
        header = ["run", *metrics]
        body = [[r["checkpoint"], *[_marked_cell(r, m) for m in metrics]] for r in runs]
        return [header, *body]
    columns = table["columns"]
    header = ["row"] + [c["label"] for c in columns] + [f"paper {c['label']}" for c in columns]
    body = []
    for i, row in enumerate(table.get("rows", [])):
        res = runs[i] if i < len(runs) else None
        values: dict[str, dict[str, Any] | None] = {}
        marks: dict[str, bool] = {}
        for c in columns:
            metric = c.get("metric", {}).get(scale)
            if metric:
                values[c["label"]] = _metric(res, metric)
                marks[c["label"]] = non_official(res, metric.partition("/")[0])
            elif scale in c.get("combine", {}):
                values[c["label"]] = _combine(values, c["combine"][scale])
                marks[c["label"]] = any(marks.get(label, False) for label in c["combine"][scale])
            else:
                values[c["label"]] = None
        ours = [
            metric_cell(values[c["label"]]) + (NON_OFFICIAL_MARK if marks.get(c["label"]) and values[c["label"]] else "")
            for c in columns
        ]
        paper = [fmt(row.get("paper", {}).get(c["label"]), 3) for c in columns]
        body.append([row["label"], *ours, *paper])
    return [header, *body]


def _marked_cell(res: dict[str, Any], metric: str) -> str:
    cell = metric_cell(_metric(res, metric))
    return cell + NON_OFFICIAL_MARK if cell != "-" and non_official(res, metric.partition("/")[0]) else cell


def _combine(values: dict[str, dict[str, Any] | None], weights: dict[str, float]) -> dict[str, Any] | None:
    """A weighted sum of earlier columns (e.g. Table 1's Average); no interval."""
    parts = [values.get(label) for label in weights]
    if any(p is None for p in parts):
        return None
    value = sum(w * p["value"] for w, p in zip(weights.values(), parts))
    return {"value": value, "ci_low": math.nan, "ci_high": math.nan}


def _metric(res: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if res is None:
        return None
    bench, _, name = metric.partition("/")
    return res["benchmarks"].get(bench, {}).get("metrics", {}).get(name)


def _sample_grid(res: dict[str, Any], out_dir: Path, n_prompts: int = 8, n_samples: int = 4) -> str:
    parts = []
    for bench, entry in sorted(res["benchmarks"].items()):
        root = Path(entry["images"])
        scores_path = Path(res["_path"]).parent / "scores" / f"{bench}.parquet"
        scores = pd.read_parquet(scores_path) if scores_path.is_file() else None
        parts.append(f"<h3>{html.escape(bench)}</h3><table class='grid'>")
        for index in range(min(n_prompts, entry["n_prompts"])):
            meta_path = root / f"{index:05d}" / "metadata.jsonl"
            prompt = json.loads(meta_path.read_text())["prompt"] if meta_path.is_file() else ""
            cells = []
            for sample in range(n_samples):
                path = root / f"{index:05d}" / "samples" / f"{sample:04d}.png"
                if not path.is_file():
                    continue
                score = ""
                if scores is not None:
                    hit = scores[(scores["index"] == index) & (scores["sample"] == sample)]
                    score = fmt(float(hit["score"].iloc[0])) if len(hit) else ""
                src = html.escape(os.path.relpath(path, out_dir))
                cells.append(f"<td><img src='{src}' width='128'><br>{score}</td>")
            parts.append(f"<tr><th>{html.escape(prompt)}</th>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def write_report(
    run_paths: Sequence[str | Path], out: str | Path, table_name: str | None = None, scale: str = "mini"
) -> dict[str, Path]:
    """Write report.md, report.csv and report.html into ``out``; returns their paths."""
    runs = [load_results(p) for p in run_paths]
    table = load_table(table_name) if table_name else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _table_rows(runs, table, scale)
    title = table.get("title", table_name) if table else "flowopd report"
    md = [f"# {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", "Cells: value [95% bootstrap interval over prompts]."]
    if any(NON_OFFICIAL_MARK in cell for row in rows[1:] for cell in row):
        md += ["", NON_OFFICIAL_NOTE]
    for res in runs:
        md += ["", "## " + res["checkpoint"], "", markdown_summary(res)]
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "html": out_dir / "report.html"}
    paths["md"].write_text("\n".join(md) + "\n")
    results_frame(runs).to_csv(paths["csv"], index=False)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    grids = "".join(f"<h2>{html.escape(r['checkpoint'])}</h2>{_sample_grid(r, out_dir)}" for r in runs)
    paths["html"].write_text(
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
        "padding:4px;font-size:12px} img{image-rendering:pixelated}</style>"
        f"<h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>{grids}\n"
    )
    return paths
