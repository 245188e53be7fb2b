"""The seesaw figure (METHOD.md s.1): every benchmark's score along each single-reward teacher's and GRPO-Mix's
training, to show a teacher lowering the benchmarks it is not trained for.

``python -m flowopd.paper seesaw [--preset mini|sd35m] [--retrain] [--out DIR]``; ``nox -s seesaw`` calls it.
Each run's saved checkpoints (``<run>/checkpoints/iteration-N/adapter``) are evaluated on the four Table 1
benchmarks, with the base model as iteration 0 (evaluations resume like every ``evaluate``). Output:
``seesaw.csv`` (run, iteration, benchmark, value, 95% interval), ``seesaw.md`` and ``seesaw.png``.

Mini preset: the runs are the GRPO recipes' output directories (``runs/mini_grpo_*``); ``--retrain`` trains
the missing ones first. sd35m preset: the run directories of your own training, listed in the
``[seesaw]`` table of the SD3.5-M checkpoint list (``"GRPO-GenEval" = "/path/to/run"``; the list is found as
:mod:`flowopd.paper.checkpoints` says).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowopd.bench.evaluate import evaluate, run_name
from flowopd.bench.report import SCALE_TITLES
from flowopd.paper.checkpoints import MissingCheckpointsError, read_checkpoint_list
from flowopd.paper.recipes import run_recipe

logger = logging.getLogger(__name__)

BENCHMARKS = {
    "mini": ["mini-geneval", "mini-ocr", "mini-quality", "mini-pick"],
    "sd35m": ["geneval", "ocr", "deqa", "pickscore"],
}
LABELS = {"mini-geneval": "GenEval", "mini-ocr": "OCR", "mini-quality": "DeQA (mini-quality)",
          "mini-pick": "PickScore (mini-pick)", "geneval": "GenEval", "ocr": "OCR", "deqa": "DeQA",
          "pickscore": "PickScore"}
BASE = {"mini": "mini:base", "sd35m": "stabilityai/stable-diffusion-3.5-medium"}
#: label -> (run directory, recipe) of the mini preset: the GRPO teachers and GRPO-Mix.
MINI_RUNS: dict[str, tuple[str, str]] = {
    label: (f"runs/mini_grpo_{task}", f"grpo training/configs/mini_grpo_{task}.toml")
    for label, task in (("GRPO-GenEval", "geneval"), ("GRPO-OCR", "ocr"), ("GRPO-DeQA", "quality"),
                        ("GRPO-PickScore", "pick"), ("GRPO-Mix", "mix"))
}


@dataclass(frozen=True)
class Point:
    run: str
    iteration: int
    checkpoint: str


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, adapter directory) of every saved checkpoint of a training run, in order."""
    out = []
    for path in sorted((run_dir / "checkpoints").glob("iteration-[0-9]*[0-9]")):
        adapter = path / "adapter"
        if (adapter / "adapter_config.json").is_file():
            out.append((int(path.name.split("-")[1]), adapter))
    return out


def _runs(preset: str, config: Path | None) -> tuple[dict[str, Path], Path | None]:
    """(label -> run directory, the checkpoint list they came from: None for the mini preset)."""
    if preset == "mini":
        return {label: Path(d) for label, (d, _) in MINI_RUNS.items()}, None
    path, listed = read_checkpoint_list(config, "seesaw", "list your GRPO run directories in its [seesaw] table")
    runs = {k: Path(v) for k, v in listed.items() if v}
    if not runs:
        raise MissingCheckpointsError(f"{path}: the [seesaw] table lists no run directories "
                                      f"(\"GRPO-GenEval\" = \"/path/to/run\", ...)")
    return runs, path


def plan(preset: str = "mini", config: Path | None = None, retrain: bool = False) -> list[Point]:
    """The checkpoints to evaluate: the base, then every saved checkpoint of every run."""
    runs, source = _runs(preset, config)
    if retrain and preset == "mini":
        for label, (run_dir, recipe) in MINI_RUNS.items():
            if not run_checkpoints(Path(run_dir)):
                run_recipe(recipe, f"[seesaw] {label}")
    empty = [f"{label} ({d})" for label, d in runs.items() if not run_checkpoints(d)]
    if empty:
        if preset == "mini":
            hint = ("run with --retrain to train them (each GRPO recipe, then the evaluations), or see the committed "
                    "figure reports/mini/seesaw/seesaw.png")
        else:
            hint = f"check the [seesaw] table of {source}"
        raise MissingCheckpointsError(f"seesaw: no saved checkpoints for {', '.join(empty)}; {hint}")
    points = [Point("base", 0, BASE[preset])]
    for label, d in runs.items():
        points += [Point(label, it, str(adapter)) for it, adapter in run_checkpoints(d)]
    return points


def _metric(results: dict[str, Any], benchmark: str) -> dict[str, float]:
    entry = results["benchmarks"][benchmark]["metrics"]["mean"]
    return {k: float(entry[k]) for k in ("value", "ci_low", "ci_high")}


def collect(points: list[Point], benchmarks: list[str], runs_root: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Evaluate every point (resumable) and return one row per (run, iteration, benchmark)."""
    rows = []
    for i, p in enumerate(points, 1):
        logger.info("[seesaw] %d/%d %s iteration %d: %s", i, len(points), p.run, p.iteration, p.checkpoint)
        if p.run == "base":
            out = runs_root / run_name(p.checkpoint)
        else:
            out = runs_root / run_name(p.run) / f"iteration-{p.iteration:06d}"
        results = evaluate(p.checkpoint, benchmarks, out=out, device=device, progress=False, log=lambda _: None)
        for b in benchmarks:
            rows.append({"run": p.run, "iteration": p.iteration, "benchmark": b, **_metric(results, b)})
    return rows


def write_seesaw(rows: list[dict[str, Any]], out: Path, preset: str = "mini") -> dict[str, Path]:
    """seesaw.csv, seesaw.md and seesaw.png (one panel per benchmark, one line per run from the base)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "seesaw.csv", "md": out / "seesaw.md", "png": out / "seesaw.png"}
    fields = ["run", "iteration", "benchmark", "value", "ci_low", "ci_high"]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in rows)
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    base = {r["benchmark"]: r["value"] for r in rows if r["run"] == "base"}
    keys = list(dict.fromkeys((r["run"], r["iteration"]) for r in rows))
    cell = {(r["run"], r["iteration"], r["benchmark"]): r for r in rows}
    lines = [f"# Seesaw: each benchmark along each GRPO run's training - {SCALE_TITLES[preset]}", "",
             "Score (change from the base); 95% prompt-bootstrap interval in brackets.", "",
             "| run | iteration | " + " | ".join(LABELS.get(b, b) for b in benchmarks) + " |",
             "|---|---:|" + "---:|" * len(benchmarks)]
    for run, it in keys:
        cells = []
        for b in benchmarks:
            r = cell.get((run, it, b))
            if r is None:
                cells.append("-")
                continue
            delta = "" if run == "base" else f" ({r['value'] - base.get(b, math.nan):+.3f})"
            cells.append(f"{r['value']:.3f}{delta} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {run} | {it} | " + " | ".join(cells) + " |")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(rows, benchmarks, paths["png"])
    return paths


def _plot(rows: list[dict[str, Any]], benchmarks: list[str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the seesaw figure needs matplotlib: pip install 'flowopd[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in dict.fromkeys(r["run"] for r in rows) if r != "base"]
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.2 * len(benchmarks), 3.6), squeeze=False)
    for ax, b in zip(axes[0], benchmarks):
        base = [r for r in rows if r["run"] == "base" and r["benchmark"] == b]
        for run in runs:
            pts = sorted((r for r in rows if r["run"] == run and r["benchmark"] == b), key=lambda r: r["iteration"])
            pts = base + pts
            x = [r["iteration"] for r in pts]
            ax.plot(x, [r["value"] for r in pts], marker="o", ms=3, label=run)
            ax.fill_between(x, [r["ci_low"] for r in pts], [r["ci_high"] for r in pts], alpha=0.12)
        if base:
            ax.axhline(base[0]["value"], color="k", lw=0.8, ls="--")
        ax.set_title(LABELS.get(b, b))
        ax.set_xlabel("GRPO iteration")
    axes[0][0].set_ylabel("score (base dashed)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seesaw(
    preset: str = "mini",
    retrain: bool = False,
    config: Path | None = None,
    out: Path = Path("reports/out/seesaw"),
    runs_root: Path = Path("runs"),
    device: str = "cpu",
) -> dict[str, Path]:
    points = plan(preset, config, retrain)
    rows = collect(points, BENCHMARKS[preset], runs_root / preset / "seesaw", device)
    return write_seesaw(rows, out, preset)
