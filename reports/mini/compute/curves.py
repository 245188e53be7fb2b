"""Reward versus compute for the four single-reward mini teachers, against issue 23's targets and the world's own
reference images. Reads the measured points - ../seesaw/seesaw.csv (the CPU DeQA and PickScore teachers every 12
iterations, test benchmarks), gpu_validation.csv (the GenEval and OCR teachers, validation sets; the numbers of
reports/mini/README.md "GenEval and OCR"), ceiling.csv (ceiling.py) - and writes curves.png and curves.md.

    python reports/mini/compute/curves.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
CPU_ROLLOUTS = 64  # the CPU recipes: 8 prompts x 8 samples per iteration
TARGETS = {"mini-geneval": 0.15, "mini-ocr": 0.15, "mini-quality": 0.5, "mini-pick": 1.0}  # issue 23
PANELS = [  # benchmark, teacher, where its points come from
    ("mini-geneval", "GRPO-GenEval", "validation (mini-geneval-val, 320 images)"),
    ("mini-ocr", "GRPO-OCR", "validation (mini-ocr-val, 1,068 images)"),
    ("mini-quality", "GRPO-DeQA", "test (mini-quality, 192 images)"),
    ("mini-pick", "GRPO-PickScore", "test (mini-pick, 192 images)"),
]


def _rows(name: str) -> list[dict[str, str]]:
    with open(HERE / name) as f:
        return list(csv.DictReader(f))


def points() -> dict[str, list[dict[str, float | str]]]:
    """Per benchmark: the base and the teacher's checkpoints as {rollouts, iteration, device, score, lo, hi, gain}."""
    out: dict[str, list[dict[str, float | str]]] = {}
    gpu = _rows("gpu_validation.csv")
    for bench, _, _ in PANELS[:2]:
        rows = [r for r in gpu if r["benchmark"] == f"{bench}-val"]
        base = next(float(r["score"]) for r in rows if r["teacher"] == "base")
        out[bench] = [{"iteration": int(r["iteration"]),
                       "rollouts": int(r["iteration"]) * int(r["rollouts_per_iteration"]),
                       "device": r["device"], "score": float(r["score"]), "lo": float(r["ci_low"]),
                       "hi": float(r["ci_high"]), "gain": float(r["score"]) - base} for r in rows]
    seesaw = _rows("../seesaw/seesaw.csv")
    for bench, teacher, _ in PANELS[2:]:
        base = next(float(r["value"]) for r in seesaw if r["run"] == "base" and r["benchmark"] == bench)
        out[bench] = [{"iteration": int(r["iteration"]), "rollouts": int(r["iteration"]) * CPU_ROLLOUTS,
                       "device": "-" if r["run"] == "base" else "2 CPU cores", "score": float(r["value"]),
                       "lo": float(r["ci_low"]), "hi": float(r["ci_high"]), "gain": float(r["value"]) - base}
                      for r in seesaw if r["run"] in ("base", teacher) and r["benchmark"] == bench]
    return out


def main() -> None:
    data = points()
    ceiling = {r["benchmark"]: float(r["renderer"]) for r in _rows("ceiling.csv")}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    lines = ["# Reward versus compute: the single-reward mini teachers", "",
             "Gain over the base on the teacher's own benchmark (score - base; 95% prompt-bootstrap interval of the "
             "score). Target: issue 23's. Renderer: the world's own reference images on the test prompts "
             "(ceiling.csv) minus the base. Made by `python reports/mini/compute/curves.py`.", "",
             "| benchmark | teacher | split | iteration | rollouts | device | score [95% CI] | gain | of target |",
             "|---|---|---|---:|---:|---|---|---:|---:|"]
    for ax, (bench, teacher, split) in zip(axes, PANELS):
        pts = sorted(data[bench], key=lambda p: p["rollouts"])
        base = next(p for p in pts if p["rollouts"] == 0)
        trained = [p for p in pts if p["rollouts"] > 0]
        for device, marker in (("2 CPU cores", "o"), ("H100", "s")):
            sel = [p for p in trained if p["device"] == device]
            if sel:
                ax.errorbar([p["rollouts"] for p in sel], [p["gain"] for p in sel],
                            yerr=[[p["score"] - p["lo"] for p in sel], [p["hi"] - p["score"] for p in sel]],
                            marker=marker, capsize=3, linestyle="-" if device != "H100" else "--",
                            label=f"{teacher}, {device}")
        ax.axhline(TARGETS[bench], color="tab:red", linestyle="--", label=f"target +{TARGETS[bench]}")
        ax.axhline(ceiling[bench] - base["score"], color="tab:gray", linestyle=":",
                   label=f"renderer - base (+{ceiling[bench] - base['score']:.2f})")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("rollouts trained on")
        ax.set_ylabel(f"gain over base, {bench}")
        ax.set_title(f"{teacher}: {split}", fontsize=9)
        ax.legend(fontsize=7)
        for p in pts:
            lines.append(f"| {bench} | {'base' if p['rollouts'] == 0 else teacher} | {split.split(' ')[0]} | "
                         f"{p['iteration']} | {p['rollouts']:,} | {p['device']} | {p['score']:.3f} "
                         f"[{p['lo']:.3f}, {p['hi']:.3f}] | {p['gain']:+.3f} | {p['gain'] / TARGETS[bench]:.0%} |")
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)
    (HERE / "curves.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'curves.png'} and {HERE / 'curves.md'}")


if __name__ == "__main__":
    main()
