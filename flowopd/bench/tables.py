"""Reproduce a paper table: resolve each row's checkpoint for a preset, (re)train what is missing when
asked, evaluate every row on the table's benchmarks, and write the report beside the paper's numbers.

``python -m flowopd.bench table table1 [--preset mini|sd35m] [--retrain] [--config FILE]``; the nox
sessions ``table1``, ``table2``, ``table3`` call it.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.bench.evaluate import evaluate, run_name
from flowopd.bench.report import load_table, write_report
from flowopd.models.loading import checkpoint_dir

SD35M_CONFIG = Path("reports/sd35m_checkpoints.toml")


class MissingCheckpointsError(FileNotFoundError):
    """Rows of a table whose checkpoints are not available; the message lists them all."""


def table_benchmarks(table: dict[str, Any], preset: str) -> list[str]:
    names = []
    for column in table["columns"]:
        metric = column.get("metric", {}).get(preset)
        if metric and metric.split("/")[0] not in names:
            names.append(metric.split("/")[0])
    return names


def _sd35m_checkpoints(config: Path) -> dict[str, str]:
    if not config.is_file():
        raise MissingCheckpointsError(
            f"{config}: no such file; copy reports/sd35m_checkpoints.toml and fill in your checkpoints"
        )
    return {k: str(v) for k, v in tomllib.loads(config.read_text()).get("checkpoints", {}).items()}


def _available(checkpoint: str) -> bool:
    if not checkpoint:
        return False
    path = checkpoint_dir(checkpoint)
    if path.is_dir():
        return True
    if checkpoint.startswith("mini:") or checkpoint.startswith((".", "/")):
        return False
    from flowopd.bench.cli import weights_cached

    return weights_cached(f"{checkpoint}:model_index.json")  # a hub id: only if it is in the local cache


def resolve_rows(table: dict[str, Any], preset: str, config: Path | None = None) -> list[tuple[str, str]]:
    """(row label, checkpoint) for every row; raises MissingCheckpointsError naming all missing ones."""
    rows = table["rows"]
    if preset == "sd35m":
        config = config or SD35M_CONFIG
        given = _sd35m_checkpoints(config)
        pairs = [(r["label"], given.get(r["label"], "")) for r in rows]
        missing = [f"{label!r} ({ckpt or 'not set'})" for label, ckpt in pairs if not _available(ckpt)]
        if missing:
            raise MissingCheckpointsError(
                f"{table['name']} --preset sd35m: missing checkpoints for {', '.join(missing)}; "
                f"set their paths (diffusers dirs, LoRA adapter dirs or cached hub ids) in {config}"
            )
        return pairs
    return [(r["label"], r["run"][preset]) for r in rows]


def run_recipe(command: str, prefix: str) -> None:
    """Run one recipe step ``python -m flowopd.train COMMAND`` in this process (logged after ``prefix``);
    raise if it fails."""
    from flowopd.train.__main__ import main as train_main

    print(f"{prefix}: python -m flowopd.train {command}")
    code = train_main(shlex.split(command))
    if code:
        raise RuntimeError(f"recipe `python -m flowopd.train {command}` failed with exit code {code}")


def retrain(table: dict[str, Any], preset: str, force: bool = False) -> None:
    """Run the recipe of every row whose checkpoint is missing (all rows with ``force``), in table order."""
    for row in table["rows"]:
        checkpoint = row["run"][preset]
        if _available(checkpoint) and not force:
            continue
        for command in row.get("recipe", {}).get(preset, []):
            run_recipe(command, f"[{table['name']}] {row['label']}")


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
    missing = [f"{label!r} ({ckpt})" for label, ckpt in pairs if not _available(ckpt)]
    if missing:
        raise MissingCheckpointsError(
            f"{name}: missing checkpoints for {', '.join(missing)}; run with --retrain to train them"
        )
    benchmarks = table_benchmarks(table, preset)
    run_dirs, labels = [], []
    t0 = time.perf_counter()
    for i, (label, checkpoint) in enumerate(pairs, 1):
        run_dir = runs / preset / run_name(checkpoint)
        print(f"[{name}] {i}/{len(pairs)} {label}: {checkpoint} ({', '.join(benchmarks)}) -> {run_dir}", flush=True)
        results = evaluate(checkpoint, benchmarks, out=run_dir, device=device, batch_size=batch_size, limit=limit,
                           progress=progress, log=lambda m: print(f"[{name}]   {m}", flush=True))
        run_dirs.append(run_dir)
        labels.append(results["checkpoint"])
        print(f"[{name}] {i}/{len(pairs)} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return write_report(run_dirs, out / name, table_name=name, scale=preset, checkpoints=labels)
