"""Scoring cached images with a benchmark's scorer into per-sample rows (parquet), resumably.

Rows are appended to ``<scores>/<benchmark>.partial.jsonl`` batch by batch; an interrupted run resumes
from there, and the finished table is written once as ``<scores>/<benchmark>.parquet``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from flowopd.bench.images import load_png
from flowopd.bench.spec import BenchmarkSpec
from flowopd.scorers.base import ScoreBatch, Scorer


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def score_images(
    spec: BenchmarkSpec,
    scorer: Scorer,
    prompts: Sequence[Mapping[str, Any]],
    files: Mapping[int, Sequence[Path]],
    scores_dir: Path,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every image in ``files`` (prompt index -> sample paths); returns one row per image."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    final = scores_dir / f"{spec.name}.parquet"
    partial = scores_dir / f"{spec.name}.partial.jsonl"
    todo = [(i, k, path) for i, paths in sorted(files.items()) for k, path in enumerate(paths)]
    key = {"scorer": spec.scorer, "scorer_version": scorer.version}

    if final.is_file():
        df = pd.read_parquet(final)
        same = set(zip(df["index"], df["sample"])) == {(i, k) for i, k, _ in todo}
        if same and (df["scorer_version"] == scorer.version).all():
            return df
        final.unlink()

    done: dict[tuple[int, int], dict[str, Any]] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: its image is scored again
            if row.get("scorer_version") == scorer.version:
                done[(row["index"], row["sample"])] = row
    remaining = [t for t in todo if (t[0], t[1]) not in done]

    bar = tqdm(total=len(todo), initial=len(todo) - len(remaining), desc=f"score {spec.name}", unit="img",
               disable=not progress)
    with open(partial, "a") as log:
        for start in range(0, len(remaining), batch_size):
            batch = remaining[start : start + batch_size]
            images = torch.stack([load_png(path) for _, _, path in batch])
            metas = [prompts[i] for i, _, _ in batch]
            result: ScoreBatch = scorer.score(images, [m["prompt"] for m in metas], metas)
            if len(result) != len(batch):
                raise RuntimeError(f"scorer {spec.scorer!r} returned {len(result)} scores for {len(batch)} images")
            for j, ((i, k, path), row) in enumerate(zip(batch, result.rows())):
                meta = metas[j]
                full = {"index": i, "sample": k, "prompt": meta["prompt"], "file": str(path), **key}
                if spec.group_by and spec.group_by not in row:
                    full[spec.group_by] = meta.get(spec.group_by)
                full.update({name: _jsonable(v) for name, v in row.items()})
                done[(i, k)] = full
                log.write(json.dumps(full) + "\n")
            log.flush()
            bar.update(len(batch))
    bar.close()
    df = pd.DataFrame([done[(i, k)] for i, k, _ in todo])
    df["score"] = df["score"].astype(float)
    tmp = final.with_name(final.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(final)
    partial.unlink(missing_ok=True)
    return df
