"""Within-prompt diversity of the hacking ablation's evaluation images (issue 23, the MAR point).

For every evaluation directory of ``run.sh`` (runs/mar-hacking/eval/<name>/images/<image set>/<idx>/samples/*.png)
and every prompt: the mean over pixels and channels of the per-pixel standard deviation (population) across the
prompt's images - the training monitor's ``monitor/group_diversity`` (flowopd.train.monitor.group_diversity) for
one group. Writes reports/mini/mar-hacking/diversity.csv (name, image_set, prompt, n_images, diversity), which
table.py reads; the images themselves are not committed.

    python reports/mini/mar-hacking/diversity.py [EVAL_ROOT]      (default runs/mar-hacking/eval)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

from flowopd.bench.images import load_png
from flowopd.train.monitor import group_diversity

HERE = Path(__file__).resolve().parent


def prompt_diversity(sample_dir: Path) -> tuple[int, float]:
    files = sorted(sample_dir.glob("*.png"))
    if len(files) < 2:
        raise SystemExit(f"{sample_dir}: {len(files)} image(s); diversity needs at least 2 per prompt")
    images = torch.stack([load_png(f) for f in files])
    return len(files), group_diversity(images, [0] * len(files))


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path("runs/mar-hacking/eval")
    if not root.is_dir():
        raise SystemExit(f"{root}: no such directory (run reports/mini/mar-hacking/run.sh first)")
    rows = []
    for run in sorted(p for p in root.iterdir() if (p / "images").is_dir()):
        for image_set in sorted(p for p in (run / "images").iterdir() if p.is_dir()):
            for prompt in sorted(p for p in image_set.iterdir() if (p / "samples").is_dir()):
                n, d = prompt_diversity(prompt / "samples")
                rows.append({"name": run.name, "image_set": image_set.name, "prompt": int(prompt.name),
                             "n_images": n, "diversity": f"{d:.6f}"})
    if not rows:
        raise SystemExit(f"{root}: no evaluation images found")
    out = HERE / "diversity.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{out}: {len(rows)} prompts of {len({r['name'] for r in rows})} evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
