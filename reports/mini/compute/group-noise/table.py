"""Shared versus independent group noise in GRPO-OCR (run.sh of this directory): writes table.md.

Reads the committed validation evaluations (val-{shared,indep}-N/; mini:base and the shared arm's iteration 24
are ../base-3000's val-base-1500/ and val-grpo-ocr-base-1500/, the same evaluations) and the runs' metrics
(the shared arm's iterations 1-24 are ../base-3000/grpo-ocr-base-1500.metrics.jsonl, 25-72 its resumptions here).
Differences are `flowopd.bench.compare`'s paired prompt bootstrap (2000 draws, seed 0): every checkpoint against
mini:base, and independent against shared at equal iterations (the same 1,068 validation strings and seeds).

    python reports/mini/compute/group-noise/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowopd.bench.compare import mean_difference
from flowopd.bench.results import load_results

HERE = Path(__file__).resolve().parent
BENCH = "mini-ocr-val"
ARMS = ("shared", "indep")
WINDOWS = ((1, 12), (13, 24), (25, 36), (37, 48), (49, 60), (61, 72))


# evaluations made for ../base-3000 that this table shares (the same checkpoints, not re-run)
ELSEWHERE = {"val-base": "../base-3000/val-base-1500", "val-shared-24": "../base-3000/val-grpo-ocr-base-1500"}


def path(run: str) -> Path:
    return (HERE / ELSEWHERE.get(run, run)).resolve()


def diff(a: str, b: str) -> str:
    return mean_difference(path(a), path(b), BENCH)


def value(run: str) -> float:
    return load_results(path(run))["benchmarks"][BENCH]["metrics"]["mean"]["value"]


def metrics(arm: str) -> dict[int, dict]:
    files = ([HERE / "../base-3000/grpo-ocr-base-1500.metrics.jsonl", HERE / "grpo-ocr-shared-25-72.metrics.jsonl"]
             if arm == "shared" else [HERE / f"grpo-ocr-{arm}.metrics.jsonl"])
    rows = (json.loads(line) for f in files for line in f.read_text().splitlines() if line)
    return {int(r["iteration"]): r for r in rows if "reward/total" in r}


def main() -> None:
    names = [p.name for p in HERE.glob("val-*-*")] + list(ELSEWHERE)
    its = sorted({int(n.rsplit("-", 1)[1]) for n in names if n[4:].startswith(ARMS)})
    out = ["# Shared vs independent starting noise in a GRPO-OCR group (mini:base, 384 rollouts an iteration)", "",
           "Training signal, means over iterations (from the runs' metrics.jsonl):", "",
           "| iterations | arm | rollout reward | zero-variance groups | within-group diversity | s / iteration |",
           "|---|---|---|---|---|---|"]
    runs = {arm: metrics(arm) for arm in ARMS}
    for lo, hi in WINDOWS:
        for arm in ARMS:
            rs = [runs[arm][i] for i in range(lo, hi + 1) if i in runs[arm]]
            if not rs:
                continue
            m = {k: float(np.mean([r[k] for r in rs])) for k in
                 ("reward/total", "train/zero_std_groups", "monitor/group_diversity", "time/iteration_s")}
            out.append(f"| {lo}-{hi} | {arm} | {m['reward/total']:.3f} | {m['train/zero_std_groups']:.2f} | "
                       f"{m['monitor/group_diversity']:.3f} | {m['time/iteration_s']:.0f} |")
    out += ["", f"Held out: {BENCH} (1,068 train-split strings, seed 1; mini:base {value('val-base'):.3f}), "
            "paired differences with 95 % intervals (* excludes 0):", "",
            "| iteration | shared | shared - base | independent | independent - base | independent - shared |",
            "|---|---|---|---|---|---|"]
    for it in its:
        s, i = f"val-shared-{it}", f"val-indep-{it}"
        has_s, has_i = path(s).is_dir(), path(i).is_dir()
        out.append("| " + " | ".join([
            str(it),
            f"{value(s):.3f}" if has_s else "-", diff(s, "val-base") if has_s else "-",
            f"{value(i):.3f}" if has_i else "-", diff(i, "val-base") if has_i else "-",
            diff(i, s) if has_s and has_i else "-"]) + " |")
    (HERE / "table.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
