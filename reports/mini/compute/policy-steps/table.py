"""How far GRPO moves the policy per rollout batch, in GRPO-OCR (run.sh of this directory): writes table.md.

Three arms of the GRPO-OCR recipe from mini:base, every one with independent group noise and the recipe's seed
(the same prompt draws, SDE seeds and windows): the baseline (one AdamW step an iteration at lr 1e-3; the
independent arm of ../group-noise, whose metrics and evaluations are read from there), four AdamW steps an
iteration over quarters of the same rollouts (`updates_per_iteration=4`, Flow-GRPO's own split of a batch into
optimizer steps), and one step at four times the learning rate (`learning_rate=4e-3`). Held out: mini-ocr-val
(1,068 train-split strings, seed 1), `flowopd.bench.compare`'s paired prompt bootstrap (2000 draws, seed 0)
against mini:base (../base-3000/val-base-1500) and against the baseline at equal iterations.

    python reports/mini/compute/policy-steps/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowopd.bench.compare import mean_difference
from flowopd.bench.results import load_results

HERE = Path(__file__).resolve().parent
BENCH = "mini-ocr-val"
BASE = HERE / "../base-3000/val-base-1500"
# arm -> (label, metrics file, directory of its val-<arm>-<iteration>/ evaluations)
ARMS = {
    "indep": ("1 step, lr 1e-3 (baseline)", HERE / "../group-noise/grpo-ocr-indep.metrics.jsonl",
              HERE / "../group-noise"),
    "upd4": ("4 steps, lr 1e-3", HERE / "grpo-ocr-upd4.metrics.jsonl", HERE),
    "lr4e-3": ("1 step, lr 4e-3", HERE / "grpo-ocr-lr4e-3.metrics.jsonl", HERE),
}
SIGNAL = ("reward/total", "train/zero_std_groups", "train/clip_frac", "train/ratio_min", "train/ratio_max",
          "train/kl_loss", "time/iteration_s")


def evaluation(arm: str, it: int) -> Path:
    return (ARMS[arm][2] / f"val-{arm}-{it}").resolve()


def value(run: Path) -> float:
    return load_results(run)["benchmarks"][BENCH]["metrics"]["mean"]["value"]


def iterations(arm: str) -> dict[int, dict]:
    rows = (json.loads(line) for line in ARMS[arm][1].read_text().splitlines() if line)
    return {int(r["iteration"]): r for r in rows if "reward/total" in r}


def main() -> None:
    runs = {arm: iterations(arm) for arm in ARMS}
    last = min(max(r) for r in runs.values())
    out = ["# How far GRPO-OCR moves the policy per rollout batch (mini:base, 384 rollouts an iteration, "
           "independent group noise)", "",
           "Training signal, means over 12-iteration blocks (from the runs' metrics.jsonl; ratio min / max are "
           "the block's extremes, KL the KL-to-reference term):", "",
           "| iterations | arm | rollout reward | zero-variance groups | clipped fraction | ratio min / max | "
           "KL to reference | s / iteration |",
           "|---|---|---|---|---|---|---|---|"]
    for lo in range(1, last + 1, 12):
        hi = min(lo + 11, last)
        for arm, (label, _, _) in ARMS.items():
            rs = [runs[arm][i] for i in range(lo, hi + 1)]
            m = {k: [float(r[k]) for r in rs] for k in SIGNAL}
            out.append(f"| {lo}-{hi} | {label} | {np.mean(m['reward/total']):.3f} | "
                       f"{np.mean(m['train/zero_std_groups']):.2f} | {np.mean(m['train/clip_frac']):.3f} | "
                       f"{min(m['train/ratio_min']):.4f} / {max(m['train/ratio_max']):.4f} | "
                       f"{np.mean(m['train/kl_loss']):.2e} | {np.mean(m['time/iteration_s']):.0f} |")
    its = sorted(int(p.name.rsplit("-", 1)[1]) for p in HERE.glob("val-upd4-*"))
    out += ["", f"Held out: {BENCH} (1,068 train-split strings, seed 1; mini:base {value(BASE):.3f}), paired "
            "differences with 95 % intervals (* excludes 0):", "",
            "| iteration | " + " | ".join(f"{ARMS[a][0]} - base" for a in ARMS) + " | "
            + " | ".join(f"{ARMS[a][0]} - baseline" for a in list(ARMS)[1:]) + " |",
            "|---|" + "---|" * (2 * len(ARMS) - 1)]
    for it in its:
        have = {a: evaluation(a, it).is_dir() for a in ARMS}
        cells = [mean_difference(evaluation(a, it), BASE, BENCH) if have[a] else "-" for a in ARMS]
        cells += [mean_difference(evaluation(a, it), evaluation("indep", it), BENCH)
                  if have[a] and have["indep"] else "-" for a in list(ARMS)[1:]]
        out.append(f"| {it} | " + " | ".join(cells) + " |")
    (HERE / "table.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
