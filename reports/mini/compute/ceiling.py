"""The mini world's own reference images - the renderer's - scored by the Table 1 mini scorers on the test prompt
sets, as many images per prompt as the benchmark samples (a seeded layout per image). Writes ceiling.csv.

    python reports/mini/compute/ceiling.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from flowopd.bench.spec import get_spec
from flowopd.data import load_prompts
from flowopd.world import scorers
from flowopd.world.render import render_batch

SCORERS = {"mini-geneval": scorers.MiniGenEvalScorer, "mini-ocr": scorers.MiniOCRScorer,
           "mini-quality": scorers.MiniQualityScorer, "mini-pick": scorers.MiniPickScorer}


def main() -> None:
    rows = []
    for bench, scorer in SCORERS.items():
        spec = get_spec(bench)
        metas = [m for m in load_prompts(spec.prompts) for _ in range(spec.generation.images_per_prompt)]
        images = render_batch(metas, np.random.default_rng(0))
        scores = np.asarray(scorer().score(images, [m["prompt"] for m in metas], metas).scores, dtype=float)
        rows.append({"benchmark": bench, "renderer": round(float(scores.mean()), 4), "images": len(scores)})
        print(f"{bench}: renderer {scores.mean():.4f} over {len(scores)} images")
    with open(Path(__file__).with_name("ceiling.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
