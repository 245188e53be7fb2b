"""Reports: markdown, CSV and an HTML page with sample grids, from one or more runs' results.json.

With a table definition (``reports/tables/<name>.toml``) rows are the table's runs, columns its
metrics, and the paper's numbers sit beside ours, set apart as the paper's (SD3.5-M); the title and every row
label say at which scale our numbers were made. A benchmark run on fewer prompts than it has is labelled partial
in every table. ``report.html`` is self-contained: its sample images are embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.bench.results import coverage, is_partial, load_results, partial_note
from flowopd.scorers.engine import is_official

#: Appended to a cell scored by a non-official engine (a port, a substitute, an injected model).
NON_OFFICIAL_MARK = "†"
NON_OFFICIAL_NOTE = (
    f"{NON_OFFICIAL_MARK} scored by a non-official engine (a port or a substitute of the official scorer): "
    "compare with published numbers only with docs/scorers/parity.md at hand."
)


#: how a table names the scale its numbers were made at (title, row labels)
SCALE_TITLES = {"mini": "mini scale (the shapes world on CPU; not SD3.5-M)", "sd35m": "SD3.5-M scale"}
PAPER_PREFIX = "paper (SD3.5-M):"
PARTIAL_NOTE = "partial: the benchmark was run on fewer prompts than it has (--limit); not the benchmark's score."
#: longest side of an image embedded in report.html (the grid shows them at 128 px)
THUMBNAIL_SIDE = 128


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
            scored, total = coverage(entry)
            for name, m in entry["metrics"].items():
                rows.append({"run": res["checkpoint"], "benchmark": bench, "metric": f"{bench}/{name}", **m,
                             "n_prompts": scored, "n_prompts_total": total, "partial": is_partial(entry)})
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
    partial = []
    for bench, entry in sorted(results["benchmarks"].items()):
        mark = NON_OFFICIAL_MARK if non_official(results, bench) else ""
        marked = marked or bool(mark)
        note = partial_note(entry)
        label = f"{bench} ({note})" if note else bench
        partial += [label] if note else []
        for name, m in entry["metrics"].items():
            lines.append(
                f"| {label} | {name} | {fmt(m['value'])}{mark} | [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}] | {m['n']} |"
            )
    if marked:
        lines += ["", NON_OFFICIAL_NOTE]
    if partial:
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines)


def _table_rows(runs: Sequence[dict[str, Any]], table: dict[str, Any] | None, scale: str) -> list[list[str]]:
    if table is None:
        metrics = sorted({f"{b}/mean" for r in runs for b in r["benchmarks"]})
        header = ["run", *metrics]
        body = [[r["checkpoint"], *[_partial_cell(r, m, _marked_cell(r, m)) for m in metrics]] for r in runs]
        return [header, *body]
    columns = table["columns"]
    header = (["row"] + [f"{c['label']} ({scale})" for c in columns]
              + [f"{PAPER_PREFIX} {c['label']}" for c in columns])
    body = []
    for i, row in enumerate(table.get("rows", [])):
        res = runs[i] if i < len(runs) else None
        values: dict[str, dict[str, Any] | None] = {}
        marks: dict[str, bool] = {}
        partial: dict[str, str] = {}
        for c in columns:
            metric = c.get("metric", {}).get(scale)
            if metric:
                values[c["label"]] = _metric(res, metric)
                marks[c["label"]] = non_official(res, metric.partition("/")[0])
                partial[c["label"]] = _partial_tag(res, metric.partition("/")[0])
            elif scale in c.get("combine", {}):
                values[c["label"]] = _combine(values, c["combine"][scale])
                marks[c["label"]] = any(marks.get(label, False) for label in c["combine"][scale])
                partial[c["label"]] = "partial" if any(partial.get(label) for label in c["combine"][scale]) else ""
            else:
                values[c["label"]] = None
        ours = []
        for c in columns:
            cell = metric_cell(values[c["label"]])
            cell += NON_OFFICIAL_MARK if marks.get(c["label"]) and values[c["label"]] else ""
            ours.append(f"{cell} ({partial[c['label']]})" if values[c["label"]] and partial.get(c["label"]) else cell)
        paper = [fmt(row.get("paper", {}).get(c["label"]), 3) for c in columns]
        body.append([row_label(row, res, scale), *ours, *paper])
    return [header, *body]


def row_label(row: dict[str, Any], res: dict[str, Any] | None, scale: str) -> str:
    """A table row's label at ``scale``: the paper's label is SD3.5-M's, so at another scale the row names its
    own checkpoint and scale and the paper row it stands for (``mini:base (mini scale; paper row: SD3.5-M (base))``)."""
    if scale == "sd35m":
        return row["label"]
    checkpoint = row.get("run", {}).get(scale) or (res["checkpoint"] if res else "not run")
    return f"{checkpoint} ({scale} scale; paper row: {row['label']})"


def _partial_tag(res: dict[str, Any] | None, bench: str) -> str:
    entry = (res or {}).get("benchmarks", {}).get(bench)
    if not entry or not is_partial(entry):
        return ""
    scored, total = coverage(entry)
    return f"partial {scored}/{total}" if total is not None else "partial"


def _partial_cell(res: dict[str, Any], metric: str, cell: str) -> str:
    tag = _partial_tag(res, metric.partition("/")[0])
    return f"{cell} ({tag})" if tag and cell != "-" else cell


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


def data_uri(path: Path) -> str:
    """A PNG as a ``data:`` URI, downscaled to THUMBNAIL_SIDE (nearest neighbour) when larger."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > THUMBNAIL_SIDE:
            im.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sample_grid(res: dict[str, Any], n_prompts: int = 8, n_samples: int = 4) -> str:
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
                src = data_uri(path)
                cells.append(f"<td><img src='{src}' width='128'><br>{score}</td>")
            parts.append(f"<tr><th>{html.escape(prompt)}</th>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def check_rows(runs: Sequence[dict[str, Any]], table: dict[str, Any], scale: str,
               checkpoints: Sequence[str] | None = None) -> None:
    """Refuse runs that are not the table's rows in order (a run is placed by position): each run's checkpoint must
    be its row's (``checkpoints``, or the rows' ``run.<scale>`` where the table names one)."""
    rows = table.get("rows", [])
    if len(runs) > len(rows):
        raise ValueError(f"{table.get('name')}: {len(runs)} runs for {len(rows)} rows")
    expected = list(checkpoints) if checkpoints is not None else [r.get("run", {}).get(scale) for r in rows]
    for row, res, want in zip(rows, runs, expected):
        if want and res["checkpoint"] != want:
            raise ValueError(f"{table.get('name')}: row {row['label']!r} is {want} but the run in its place "
                             f"({res['_path']}) is {res['checkpoint']}; pass the runs in the table's row order")


def write_report(
    run_paths: Sequence[str | Path],
    out: str | Path,
    table_name: str | None = None,
    scale: str = "mini",
    checkpoints: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv and report.html into ``out``; returns their paths. With a table, the runs are
    its rows in order (checked against ``checkpoints``, or the rows' checkpoints at ``scale``)."""
    if scale not in SCALE_TITLES:
        raise ValueError(f"--scale {scale!r}: expected one of {', '.join(SCALE_TITLES)}")
    runs = [load_results(p) for p in run_paths]
    table = load_table(table_name) if table_name else None
    if table is not None:
        check_rows(runs, table, scale, checkpoints)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir}: a file, expected a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _table_rows(runs, table, scale)
    title = f"{table.get('title', table_name)} - {SCALE_TITLES[scale]}" if table else "flowopd report"
    md = [f"# {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    notes = ["Cells: value [95% bootstrap interval over prompts]."]
    if table is not None:
        notes.append(f"Columns headed '{PAPER_PREFIX}' are the paper's own numbers (SD3.5-M, 512 px; METHOD.md s.4), "
                     + ("not measured here and not on the mini scale's benchmarks." if scale != "sd35m"
                        else "not measured here."))
    if any(NON_OFFICIAL_MARK in cell for row in rows[1:] for cell in row):
        notes.append(NON_OFFICIAL_NOTE)
    if any("(partial" in cell for row in rows[1:] for cell in row):
        notes.append(PARTIAL_NOTE)
    for note in notes:
        md += ["", note]
    for res in runs:
        md += ["", "## " + res["checkpoint"], "", markdown_summary(res)]
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "html": out_dir / "report.html"}
    paths["md"].write_text("\n".join(md) + "\n")
    results_frame(runs).to_csv(paths["csv"], index=False)
    n_ours = (len(rows[0]) - 1) // 2 if table is not None else len(rows[0]) - 1

    def cells(r: list[str], tag: str) -> str:
        return "".join(f"<{tag}{' class=paper' if j > n_ours else ''}>{html.escape(c)}</{tag}>"
                       for j, c in enumerate(r))

    group = (f"<tr><th></th><th colspan={n_ours}>ours ({html.escape(SCALE_TITLES[scale])})</th>"
             f"<th colspan={n_ours} class=paper>the paper's numbers (SD3.5-M)</th></tr>") if table else ""
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows[1:])
    grids = "".join(f"<h2>{html.escape(r['checkpoint'])}</h2>{_sample_grid(r)}" for r in runs)
    paths["html"].write_text(
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
        "padding:4px;font-size:12px} .paper{background:#eee;color:#555} img{image-rendering:pixelated}</style>"
        f"<h1>{html.escape(title)}</h1><table>{group}<tr>{cells(rows[0], 'th')}</tr>{body}</table>"
        + "".join(f"<p>{html.escape(note)}</p>" for note in notes) + f"{grids}\n"
    )
    return paths
