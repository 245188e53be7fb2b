"""Training diagnostics for the seesaw of METHOD.md s.1: per-task reward curves, and the cosine similarity
between the gradients of different tasks' losses on the shared adapter (gradient interference).

Per-task reward curves: every iteration with a reward, the GRPO and OPD loops log ``reward_task/<task>``
(the mean reward of that task's samples, :func:`task_reward_metrics`) to tensorboard and ``metrics.jsonl``;
:func:`plot_task_rewards` draws them for one or more runs.

Gradient cosines: every ``grad_cosine_every`` iterations (off by default) the loops draw a probe batch of
``grad_cosine_prompts`` prompts x ``group_size`` samples from every prompt source, with a generator of its own
(so the training run is the same with the probe on or off), sample it with the current policy and compute,
for each task, the gradient of that task's loss on the shared adapter parameters:

- GRPO (GRPO-Mix): the clipped surrogate with the group advantages of the task's samples;
- OPD: the clipped surrogate with the dense ``-KL_t`` advantage of the task's routed teacher (or the mode's
  loss: GKD, mixed).

The regularisers (GRPO's KL to the reference, OPD's MAR) are left out: they pull every task the same way and
would hide the interference between the task terms. The cosine of two tasks' gradients (:func:`task_gradient_cosines`)
goes to tensorboard and ``metrics.jsonl`` as ``grad_cosine/<a>__<b>`` (with ``grad_norm_task/<task>``) and to
``<output_dir>/grad_cosines.csv``; :func:`plot_gradient_cosines` compares runs, e.g. GRPO-Mix against OPD::

    python -m flowopd.train.diagnostics cosines runs/mini_grpo_mix runs/mini_opd_merge --out cosines.png
    python -m flowopd.train.diagnostics rewards runs/mini_grpo_mix runs/mini_opd_merge --out rewards.png

Reward-hacking monitor (:mod:`flowopd.train.monitor`): the loops log ``monitor/blank_rate``,
``monitor/group_diversity`` and ``monitor/image_std`` every iteration, and a mini run with ``monitor_probe_every``
the probe set's ``monitor/probe/<benchmark>`` (:mod:`flowopd.train.probe`); :func:`plot_monitor` draws them beside
``reward/total``::

    python -m flowopd.train.diagnostics monitor runs/mini_grpo_geneval --out monitor.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowopd.logs import add_log_level_argument, configure
from flowopd.train.probe import METRIC_PREFIX as PROBE_PREFIX
from flowopd.train.probe import PROBE_BENCHMARKS

CSV_NAME = "grad_cosines.csv"
_COLUMNS = ("iteration", "task_a", "task_b", "cosine")


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one float32 vector (zeros where a parameter is unused).

    Uses ``torch.autograd.grad``, so the parameters' ``.grad`` (and an optimizer's step) are untouched.
    """
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().float().reshape(-1)
                      for g, p in zip(grads, params)])


def gradient_cosines(grads: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    """``{(a, b): cos(g_a, g_b)}`` for every pair of tasks ``a < b`` (NaN where a gradient is zero)."""
    tasks = sorted(grads)
    out: dict[tuple[str, str], float] = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            ga, gb = grads[a].double(), grads[b].double()
            denom = float(ga.norm() * gb.norm())
            out[(a, b)] = float(ga @ gb) / denom if denom > 0 else math.nan
    return out


class TaskGradients:
    """Per-task gradients on shared parameters, accumulated one loss (one graph) at a time.

    ``add(task, loss)`` adds ``d loss / d params`` to the task's sum, so a task loss that is a sum over
    micro-batches and steps never needs all of its graphs in memory at once.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("TaskGradients: no parameters")
        self.grads: dict[str, torch.Tensor] = {}

    def add(self, task: str, loss: torch.Tensor, retain_graph: bool = False) -> None:
        g = flat_gradient(loss, self.params, retain_graph)
        if task in self.grads:
            self.grads[task] += g
        else:
            self.grads[task] = g

    def cosines(self) -> dict[tuple[str, str], float]:
        return gradient_cosines(self.grads)

    def norms(self) -> dict[str, float]:
        return {task: float(g.double().norm()) for task, g in sorted(self.grads.items())}

    def metrics(self) -> dict[str, float]:
        """``grad_cosine/<a>__<b>``, their mean ``grad_cosine/mean`` and ``grad_norm_task/<task>`` for the logs."""
        cos = self.cosines()
        out = {f"grad_cosine/{a}__{b}": v for (a, b), v in cos.items()}
        finite = [v for v in cos.values() if math.isfinite(v)]
        if cos:
            out["grad_cosine/mean"] = float(np.mean(finite)) if finite else math.nan
        out.update({f"grad_norm_task/{t}": v for t, v in self.norms().items()})
        return out


def task_gradient_cosines(
    loss_by_task: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
) -> dict[tuple[str, str], float]:
    """Cosine similarity between the gradients of the tasks' losses on ``params``, for every pair ``a < b``.

    The losses may share parts of one graph (one forward over a mixed batch): the graph is kept until the
    last task's gradient.
    """
    grads = TaskGradients(params)
    tasks = list(loss_by_task)
    for k, task in enumerate(tasks):
        grads.add(task, loss_by_task[task], retain_graph=k < len(tasks) - 1)
    return grads.cosines()


def probe_task_gradients(
    task_loss: Callable[[torch.Tensor, int], torch.Tensor],
    tasks: Sequence[str],
    positions: Sequence[int],
    params: Sequence[torch.Tensor],
    chunk: int,
) -> TaskGradients:
    """Gradient of each task's mean loss over its samples and the trained steps, chunk by chunk.

    Args:
        task_loss: ``task_loss(sample_indices, step_position)`` -> the mean loss of those samples at that step
            (the loops' per-step loss with the probe's trajectories).
        tasks: the task of every probe sample.
        positions: the trained step positions.
        chunk: samples per forward (the sampling batch size), to bound the memory of one graph.
    """
    grads = TaskGradients(params)
    labels = np.asarray(tasks)
    for task in sorted(set(tasks)):
        idx = np.flatnonzero(labels == task)
        for j in positions:
            for s in range(0, len(idx), chunk):
                part = idx[s : s + chunk]
                weight = len(part) / (len(idx) * len(positions))  # sum of chunk means = mean over all
                grads.add(task, task_loss(torch.as_tensor(part, dtype=torch.long), j) * weight)
    return grads


def task_reward_metrics(total: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """``{"reward_task/<task>": mean finite reward of the task's samples}`` (NaN when none is finite)."""
    labels = np.asarray(tasks)
    out = {}
    for task in sorted(set(tasks)):
        values = np.asarray(total, dtype=np.float64)[labels == task]
        values = values[np.isfinite(values)]
        out[f"reward_task/{task}"] = float(values.mean()) if values.size else math.nan
    return out


class GradientCosineCSV:
    """``grad_cosines.csv`` of a run: one row per (iteration, task pair); on resume, the rows after the
    resumed iteration (written by the interrupted run) are dropped."""

    def __init__(self, path: str | Path, start: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if start and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, iteration: int, cosines: Mapping[tuple[str, str], float]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for (a, b), value in sorted(cosines.items()):
                writer.writerow([iteration, a, b, value])


def _label(path: Path) -> str:
    return path.parent.name if path.is_file() else path.name


def _resolve(path: str | Path, name: str) -> Path:
    """A run directory or the file itself."""
    p = Path(path)
    f = p / name if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: pass a run's output_dir or its {name}")
    return f


def plot_gradient_cosines(
    csv_paths: Sequence[str | Path], out_png: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """One panel per task pair (and one for their mean): gradient cosine against iteration, one line per run.

    ``csv_paths`` are ``grad_cosines.csv`` files or run directories; labels default to the run directories' names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    files = [_resolve(p, CSV_NAME) for p in csv_paths]
    names = list(labels) if labels else [_label(f) for f in files]
    if len(names) != len(files):
        raise ValueError(f"plot_gradient_cosines: {len(names)} labels for {len(files)} runs")
    frames = [pd.read_csv(f) for f in files]
    pairs = sorted({(a, b) for df in frames for a, b in zip(df["task_a"], df["task_b"])})
    if not pairs:
        raise ValueError(f"plot_gradient_cosines: no rows in {[str(f) for f in files]}")
    common = set.intersection(*({(a, b) for a, b in zip(df["task_a"], df["task_b"])} for df in frames))
    panels = [*pairs, ("mean", "")]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, (a, b) in zip(axes.flat, panels):
        for i, (df, name) in enumerate(zip(frames, names)):
            if a == "mean":  # over the pairs every run has, so that the runs compare like with like
                shared = df[[(x, y) in common for x, y in zip(df["task_a"], df["task_b"])]]
                series = shared.groupby("iteration")["cosine"].mean()
            else:
                series = df[(df["task_a"] == a) & (df["task_b"] == b)].set_index("iteration")["cosine"]
            if len(series):  # one colour per run in every panel
                ax.plot(series.index, series.values, marker=".", label=name, color=f"C{i}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"mean over the {len(common)} shared pairs" if a == "mean" else f"{a} / {b}", fontsize=9)
        ax.set_xlabel("iteration")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("cosine of task gradients")
    axes[0, 0].legend(fontsize=8)
    return _save_figure(plt, fig, out_png)


def _save_figure(plt: Any, fig: Any, out_png: str | Path) -> Path:
    """Lay out, write (making the directory) and close a figure; returns the file."""
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_panels(
    plt: Any,
    curves: Sequence[dict[str, list[tuple[float, float]]]],
    names: Sequence[str],
    keys: Sequence[str],
    out_png: str | Path,
    ylabel: str | None = None,
    cols: int | None = None,
    points: Collection[str] = (),
) -> Path:
    """One panel per key against iteration (an empty key leaves its slot empty), ``cols`` panels a row (default: one
    row), one line (one colour in every panel) per run, with a marker at every value for the keys in ``points``
    (values logged at some iterations only); the legend goes on the first panel that has a line (a run without
    rewards leaves the first empty). Writes ``out_png``."""
    cols = cols or len(keys)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        if not key:  # an empty slot (the rest of a row)
            ax.axis("off")
            continue
        for i, (per_key, name) in enumerate(zip(curves, names)):
            if key in per_key:
                x, y = zip(*per_key[key])
                style = {"marker": "o", "markersize": 3} if key in points else {}
                ax.plot(x, y, label=name, color=f"C{i}", **style)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if ylabel:
        axes[0, 0].set_ylabel(ylabel)
    next(ax for ax in axes.flat if ax.lines).legend(fontsize=8)
    return _save_figure(plt, fig, out_png)


def plot_task_rewards(
    metrics_paths: Sequence[str | Path], out_png: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """One panel per task: ``reward_task/<task>`` against iteration from runs' ``metrics.jsonl``, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [_resolve(p, "metrics.jsonl") for p in metrics_paths]
    names = list(labels) if labels else [_label(f) for f in files]
    curves: list[dict[str, list[tuple[float, float]]]] = []
    for f in files:
        per_task: dict[str, list[tuple[float, float]]] = {}
        for line in f.read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key.startswith("reward_task/") and value is not None:
                    per_task.setdefault(key.removeprefix("reward_task/"), []).append((row["iteration"], value))
        curves.append(per_task)
    tasks = sorted({t for c in curves for t in c})
    if not tasks:
        raise ValueError(f"plot_task_rewards: no reward_task/* metrics in {[str(f) for f in files]}")
    return _plot_panels(plt, curves, names, tasks, out_png, ylabel="mean reward")


MONITOR_PANELS = ("reward/total", "monitor/blank_rate", "monitor/group_diversity", "monitor/image_std")


def plot_monitor(
    metrics_paths: Sequence[str | Path], out_png: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """The reward curve beside the reward-hacking monitor (:mod:`flowopd.train.monitor`): one panel per key of
    :data:`MONITOR_PANELS` against iteration from runs' ``metrics.jsonl``, one line per run; when a run has the
    probe set's ``monitor/probe/<benchmark>`` values (:mod:`flowopd.train.probe`), a second row with one panel per
    probe benchmark, a point at every iteration the probe ran. A run without ``monitor/*`` values is refused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [_resolve(p, "metrics.jsonl") for p in metrics_paths]
    names = list(labels) if labels else [_label(f) for f in files]
    if len(names) != len(files):
        raise ValueError(f"plot_monitor: {len(names)} labels for {len(files)} runs")
    curves: list[dict[str, list[tuple[float, float]]]] = []
    for f in files:
        per_key: dict[str, list[tuple[float, float]]] = {}
        for n, line in enumerate(f.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: line {n} is not JSON ({e.msg})") from None
            for key, value in row.items():
                if (key in MONITOR_PANELS or key.startswith(PROBE_PREFIX)) and value is not None and "iteration" in row:
                    per_key.setdefault(key, []).append((row["iteration"], value))
        if not any(k.startswith("monitor/") for k in per_key):
            raise ValueError(f"{f}: no monitor/* metrics (a run from before the hacking monitor?)")
        curves.append(per_key)
    known = [PROBE_PREFIX + name for name in PROBE_BENCHMARKS]
    probes = sorted({k for c in curves for k in c if k.startswith(PROBE_PREFIX)},
                    key=lambda k: (known.index(k) if k in known else len(known), k))
    if not probes:
        return _plot_panels(plt, curves, names, MONITOR_PANELS, out_png)
    cols = max(len(MONITOR_PANELS), len(probes))
    keys = [*MONITOR_PANELS, *[""] * (cols - len(MONITOR_PANELS)), *probes]
    return _plot_panels(plt, curves, names, keys, out_png, cols=cols, points=probes)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flowopd.train.diagnostics {cosines,rewards,monitor} RUN [RUN ...] --out PNG [--labels ...]``;
    a missing run or one without the plotted values is refused in one line (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m flowopd.train.diagnostics", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["cosines", "rewards", "monitor"],
                        help="gradient cosines, per-task reward curves, or the reward beside the hacking monitor")
    parser.add_argument("runs", nargs="+", help="run output directories (or their grad_cosines.csv / metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: directory names)")
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    plot = {"cosines": plot_gradient_cosines, "rewards": plot_task_rewards, "monitor": plot_monitor}[args.what]
    try:
        print(plot(args.runs, args.out, args.labels))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
