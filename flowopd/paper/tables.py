"""Reproduce a paper table: resolve each row's checkpoint for a preset, (re)train what is missing when
asked, evaluate every row on the table's benchmarks, and write the report beside the paper's numbers.

``python -m flowopd.paper table table1 [--preset mini|sd35m] [--retrain] [--config FILE]``; the nox
sessions ``table1``, ``table2``, ``table3`` call it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flowopd.bench.evaluate import evaluate, run_name
from flowopd.bench.report import load_table, write_report
from flowopd.paper.checkpoints import MissingCheckpointsError, checkpoint_available, read_checkpoint_list
from flowopd.paper.recipes import retrain

logger = logging.getLogger(__name__)


def table_benchmarks(table: dict[str, Any], preset: str) -> list[str]:
    names = []
    for column in table["columns"]:
        metric = column.get("metric", {}).get(preset)
        if metric and metric.split("/")[0] not in names:
            names.append(metric.split("/")[0])
    return names


def resolve_rows(table: dict[str, Any], preset: str, config: Path | None = None) -> list[tuple[str, str]]:
    """(row label, checkpoint) for every row; raises MissingCheckpointsError naming all missing ones."""
    rows = table["rows"]
    if preset == "sd35m":
        path, given = read_checkpoint_list(config, "checkpoints", "fill in your checkpoints")
        pairs = [(r["label"], given.get(r["label"], "")) for r in rows]
        missing = [f"{label!r} ({ckpt or 'not set'})" for label, ckpt in pairs if not checkpoint_available(ckpt)]
        if missing:
            raise MissingCheckpointsError(
                f"{table['name']} --preset sd35m: missing checkpoints for {', '.join(missing)}; "
                f"set their paths (diffusers dirs, LoRA adapter dirs or cached hub ids) in {path}"
            )
        return pairs
    return [(r["label"], r["run"][preset]) for r in rows]


def reproduce(
    name: str,
    preset: str = "mini",
    retrain_missing: bool = False,
    retrain_all: bool = False,
    config: Path | None = None,
    out: Path = Path("reports/out"),
    runs: Path = Path("runs"),
    device: str = "cpu",
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Evaluate every row of table ``name`` at ``preset`` (logging each row and its progress) and write the
    report to ``out/<name>``; returns the report's paths."""
    table = load_table(name)
    if preset == "mini" and (retrain_missing or retrain_all):
        retrain(table, preset, force=retrain_all)
    pairs = resolve_rows(table, preset, config)
    missing = [f"{label!r} ({ckpt})" for label, ckpt in pairs if not checkpoint_available(ckpt)]
    if missing:
        raise MissingCheckpointsError(
            f"{name}: missing checkpoints for {', '.join(missing)}; run with --retrain to train them"
        )
    benchmarks = table_benchmarks(table, preset)
    run_dirs, labels = [], []
    t0 = time.perf_counter()
    for i, (label, checkpoint) in enumerate(pairs, 1):
        run_dir = runs / preset / run_name(checkpoint)
        logger.info("[%s] %d/%d %s: %s (%s) -> %s", name, i, len(pairs), label, checkpoint, ", ".join(benchmarks),
                    run_dir)
        results = evaluate(checkpoint, benchmarks, out=run_dir, device=device, batch_size=batch_size, limit=limit,
                           progress=progress, log=lambda m: logger.info("[%s]   %s", name, m))
        run_dirs.append(run_dir)
        labels.append(results["checkpoint"])
        logger.info("[%s] %d/%d done (%.0f s so far)", name, i, len(pairs), time.perf_counter() - t0)
    return write_report(run_dirs, out / name, table_name=name, scale=preset, checkpoints=labels)
