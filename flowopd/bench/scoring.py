"""Scoring cached images with a benchmark's scorer into per-sample rows (parquet), resumably.

Rows are appended to ``<scores>/<benchmark>.partial.jsonl`` batch by batch (process R > 0 of a multi-process
run appends to ``<benchmark>.partial.rankR.jsonl``); an interrupted run resumes from all of them, with any
process count, and the finished table is written once as ``<scores>/<benchmark>.parquet``. Both belong to the key
in ``<scores>/<benchmark>.key.json`` (:func:`score_cache_key`: the images scored, down to each file's size and
mtime, the prompt set, the spec and scorer versions and options); scores cached under any other key - or none,
as written before keys existed - are discarded and the images scored again, never reused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from flowopd.bench.distributed import SINGLE, Shard, pending_batches
from flowopd.bench.images import key_differences, load_png
from flowopd.bench.spec import BenchmarkSpec
from flowopd.scorers.base import ScoreBatch, Scorer

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def score_cache_key(
    spec: BenchmarkSpec,
    scorer: Scorer,
    files: Mapping[int, Sequence[Path]],
    prompts_sha256: str,
    images_key: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What per-sample scores depend on: the benchmark spec and its version, the scorer, its version and options,
    the prompt set, the image set's key (flowopd.bench.images.image_set_key; None for external images) and every
    scored file as (prompt index, sample, path, size, mtime)."""
    h = hashlib.sha256()
    for i, paths in sorted(files.items()):
        for k, path in enumerate(paths):
            stat = path.stat()
            h.update(f"{i}/{k}/{path}/{stat.st_size}/{stat.st_mtime_ns}\n".encode())
    return {
        "benchmark": spec.name, "spec_version": spec.version, "scorer": spec.scorer, "scorer_version": scorer.version,
        "scorer_options": json.loads(json.dumps(spec.scorer_options, sort_keys=True, default=repr)),
        "prompts_sha256": prompts_sha256, "images": images_key, "files_sha256": h.hexdigest(),
    }


def row_file(scores_dir: Path, name: str, rank: int) -> Path:
    """The row file one process appends to (rank 0's is the single-process ``<name>.partial.jsonl``)."""
    return scores_dir / (f"{name}.partial.jsonl" if rank == 0 else f"{name}.partial.rank{rank}.jsonl")


def row_files(scores_dir: Path, name: str) -> list[Path]:
    """Every process's row file: of this run, or of an interrupted run with another process count."""
    return sorted(scores_dir.glob(f"{glob.escape(name)}.partial*.jsonl"))


def read_rows(paths: Sequence[Path], scorer_version: str) -> dict[tuple[int, int], dict[str, Any]]:
    """(prompt index, sample) -> row, from row files; rows of another scorer version are left out."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: its image is scored again
            if isinstance(row, dict) and row.get("scorer_version") == scorer_version:
                done[(row["index"], row["sample"])] = row
    return done


def _ends_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def score_images(
    spec: BenchmarkSpec,
    scorer: Scorer,
    prompts: Sequence[Mapping[str, Any]],
    files: Mapping[int, Sequence[Path]],
    scores_dir: Path,
    key: Mapping[str, Any],
    batch_size: int = 16,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    shard: Shard = SINGLE,
) -> pd.DataFrame:
    """Score every image in ``files`` (prompt index -> sample paths); returns one row per image. ``key``
    (:func:`score_cache_key`) decides whether cached scores are these images' scores.

    The batches are those of a fresh run (the ones holding an unscored image are scored whole, only the new rows
    written), dealt to the processes of ``shard`` (flowopd.bench.distributed): rank 0 checks the cache and lists
    the images without a row, each process appends its rows to its own row file, and rank 0 merges them."""
    final = scores_dir / f"{spec.name}.parquet"
    key_path = scores_dir / f"{spec.name}.key.json"
    todo = [(i, k, path) for i, paths in sorted(files.items()) for k, path in enumerate(paths)]
    row_key = {"scorer": spec.scorer, "scorer_version": scorer.version}

    def unscored() -> list[tuple[int, int, Path]] | None:
        """None when the cached table is these images' table, else the images without a row."""
        scores_dir.mkdir(parents=True, exist_ok=True)
        old_key = json.loads(key_path.read_text()) if key_path.is_file() else None
        if old_key != json.loads(json.dumps(key)):
            cached = [p for p in (final, *row_files(scores_dir, spec.name)) if p.is_file()]
            if cached:
                why = "; ".join(key_differences(old_key, key)[:3]) if old_key else f"no {key_path.name}"
                log(f"{spec.name}: scoring again: cached scores in {scores_dir} are not of these images ({why})")
            for path in cached:
                path.unlink()
            tmp = key_path.with_name(key_path.name + ".tmp")
            tmp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
            tmp.replace(key_path)
        elif final.is_file():
            return None
        done = read_rows(row_files(scores_dir, spec.name), scorer.version)
        return [t for t in todo if (t[0], t[1]) not in done]

    remaining = shard.on_main(unscored)
    if remaining is None:
        return pd.read_parquet(final)

    unscored = set(remaining)
    mine = shard.share(pending_batches(todo, batch_size, unscored))  # whole batches, as a fresh run scores them
    n_done = len(todo) - len(remaining)
    bar = tqdm(total=n_done + sum(t in unscored for b in mine for t in b), initial=n_done,
               desc=f"score {spec.name}", unit="img", disable=not progress)
    sink_path = row_file(scores_dir, spec.name, shard.rank)
    with open(sink_path, "a") as sink:
        if sink.tell() and not _ends_line(sink_path):
            sink.write("\n")  # after a line cut by an interruption: the next row starts a line of its own
        for batch in mine:
            images = torch.stack([load_png(path) for _, _, path in batch])
            metas = [prompts[i] for i, _, _ in batch]
            result: ScoreBatch = scorer.score(images, [m["prompt"] for m in metas], metas)
            if len(result) != len(batch):
                raise RuntimeError(f"scorer {spec.scorer!r} returned {len(result)} scores for {len(batch)} images")
            for j, ((i, k, path), row) in enumerate(zip(batch, result.rows())):
                if (i, k, path) not in unscored:
                    continue  # its row is in a row file already
                meta = metas[j]
                full = {"index": i, "sample": k, "prompt": meta["prompt"], "file": str(path), **row_key}
                if spec.group_by and spec.group_by not in row:
                    full[spec.group_by] = meta.get(spec.group_by)
                full.update({name: _jsonable(v) for name, v in row.items()})
                sink.write(json.dumps(full) + "\n")
            sink.flush()
            bar.update(sum(t in unscored for t in batch))
    bar.close()
    shard.barrier()

    merged: list[pd.DataFrame] = []

    def merge() -> None:
        """The table, in ``files`` order, from every process's row file; then the row files go."""
        paths = row_files(scores_dir, spec.name)
        done = read_rows(paths, scorer.version)
        missing = [(i, k) for i, k, _ in todo if (i, k) not in done]
        if missing:
            raise RuntimeError(f"{scores_dir}: no row for {len(missing)} images of {spec.name} after scoring "
                               f"(first: prompt {missing[0][0]}, sample {missing[0][1]})")
        df = pd.DataFrame([done[(i, k)] for i, k, _ in todo])
        df["score"] = df["score"].astype(float)
        tmp = final.with_name(final.name + ".tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(final)
        for path in paths:
            path.unlink()
        merged.append(df)

    shard.on_main(merge)
    return merged[0] if merged else pd.read_parquet(final)
