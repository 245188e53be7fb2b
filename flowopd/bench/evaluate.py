"""``evaluate``: prompts -> generate (resumable image cache) -> score (per-sample rows) -> aggregate.

The same function serves the CLI, the nox table sessions and periodic evaluation during training.
What is scored is pinned down (issue 19): images are cached under the checkpoint's identity
(flowopd.models.loading.Checkpoint.identity), the prompt set's sha256 and every generation setting, scores under
those images and the spec and scorer versions, and a run directory's results under one checkpoint identity;
results record how many prompts the benchmark has, so a partial run is labelled partial wherever it is shown.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowopd.bench.aggregate import aggregate
from flowopd.bench.distributed import SINGLE, Shard
from flowopd.bench.images import (
    generate_images,
    image_set_key,
    key_differences,
    match_external_images,
    sample_path,
)
from flowopd.bench.results import git_revision, load_results, new_results, save_results
from flowopd.bench.scoring import score_cache_key, score_images
from flowopd.bench.spec import BenchmarkSpec, all_specs, generation_spec, get_spec
from flowopd.data import load_prompts, prompt_set_sha256
from flowopd.models.loading import DEFAULT_CHECKPOINT, Checkpoint, load_policy, resolve_checkpoint
from flowopd.models.policy import Policy
from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer
from flowopd.scorers.engine import engine_record

logger = logging.getLogger(__name__)

# Table 1's four benchmarks at each scale (reports/tables/table1.toml's columns; tests/test_default_benchmarks.py)
SD35M_DEFAULT_BENCHMARKS = ("geneval", "ocr", "deqa", "pickscore")
MINI_DEFAULT_BENCHMARKS = ("mini-geneval", "mini-ocr", "mini-quality", "mini-pick")
ALL = "all"
"""``--benchmarks all``: every benchmark of the checkpoint's scale (the mini ones for a mini checkpoint)."""


def default_benchmarks(checkpoint: Checkpoint | None) -> list[str]:
    """Table 1's four benchmarks, at the checkpoint's scale (mini for none or a mini checkpoint); ``all`` names
    every benchmark of that scale (:func:`scale_benchmarks`)."""
    return list(MINI_DEFAULT_BENCHMARKS if _is_mini(checkpoint) else SD35M_DEFAULT_BENCHMARKS)


def scale_benchmarks(checkpoint: Checkpoint | None) -> list[str]:
    """Every benchmark of the checkpoint's scale, in name order (the specs found, FLOWOPD_BENCHMARKS_DIR's too)."""
    scale = "mini" if _is_mini(checkpoint) else "sd35m"
    return [name for name, spec in all_specs().items() if spec.scale_name == scale]


def _is_mini(checkpoint: Checkpoint | None) -> bool:
    return checkpoint is None or checkpoint.is_mini


def _benchmark_names(benchmarks: Sequence[str] | None, checkpoint: Checkpoint | None) -> list[str]:
    if not benchmarks:
        return default_benchmarks(checkpoint)
    if ALL in benchmarks:
        if len(benchmarks) > 1:
            raise ValueError(f"--benchmarks {','.join(benchmarks)}: 'all' stands alone (every benchmark of the "
                             f"checkpoint's scale); give it or the names")
        return scale_benchmarks(checkpoint)
    return list(dict.fromkeys(benchmarks))


def run_name(checkpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint.strip("/")).strip("_") or "run"


def _build_scorer(spec: BenchmarkSpec, device: str) -> Scorer:
    options = dict(spec.scorer_options)
    from flowopd.scorers import SCORERS

    params = inspect.signature(SCORERS.get(spec.scorer)).parameters
    if "device" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options.setdefault("device", device)
    return build_scorer(spec.scorer, **options)


def _check_shared_images(spec: BenchmarkSpec, owner: BenchmarkSpec) -> None:
    if spec.prompts != owner.prompts or spec.generation != owner.generation:
        raise ValueError(
            f"{spec.source}: images_from = {owner.name!r} but the prompt set or generation settings differ"
        )


def _quiet(_: str) -> None:
    """The log of every process but rank 0's."""


def _with_generation(spec: BenchmarkSpec, overrides: Mapping[str, Any] | None) -> BenchmarkSpec:
    """The spec with the caller's generation overrides, range-checked like a spec file's [generation]."""
    if not overrides:
        return spec
    values = {**dataclasses.asdict(spec.generation), **overrides}
    return dataclasses.replace(spec, generation=generation_spec(values, f"{spec.name}: generation override"))


def _check_counts(limit: int | None, batch_size: int | None) -> None:
    for name, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"evaluate: {name} must be an integer >= 1 (or None), got {value!r}")


def _run_results(run_dir: Path, label: str, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The run directory's results when they are of this checkpoint (label and identity), else a new record: a
    results.json never mixes benchmarks scored on two different models. A record re-used is re-scored by this
    code, so it records this code's git revision."""
    try:
        results = load_results(run_dir)
    except FileNotFoundError:
        return new_results(label, identity)
    if results.get("checkpoint") != label or "identity" not in results or key_differences(
        results["identity"], identity
    ):
        return new_results(label, identity)
    return {**results, "git_revision": git_revision()}


def evaluate(
    checkpoint: Checkpoint | str | None = None,
    benchmarks: Sequence[str] | None = None,
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    images: str | Path | None = None,
    base: str | None = None,
    policy: Policy | None = None,
    scorers: Mapping[str, Scorer] | None = None,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    positional: bool = False,
    identity: Mapping[str, Any] | None = None,
    shard: Shard = SINGLE,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a folder of images) on benchmarks; returns the results record.

    A ``checkpoint`` string is resolved once, with ``base`` (flowopd.models.loading.resolve_checkpoint).
    ``policy`` and ``scorers`` (benchmark name -> scorer) may be injected (tests, training loops);
    ``generation`` overrides the specs' generation settings (steps, height, width, guidance_scale, ...).
    ``identity`` names what an injected policy without a ``checkpoint`` is (a training loop passes its run and
    iteration); without one its images belong to the run directory alone. ``images`` are matched to the
    benchmark's prompts by their folders' metadata.jsonl, or by position when ``positional``. ``shard`` is this
    process's place in a multi-process run (flowopd.bench.distributed.launched): each process generates and
    scores its share, rank 0 merges the rows and writes results.json, and every process returns it.
    """
    if not shard.is_main:
        log, progress = _quiet, False
    _check_counts(limit, batch_size)
    if images is not None and (checkpoint is not None or policy is not None):
        raise ValueError("--images scores images made elsewhere: give no CHECKPOINT with it (the images are "
                         "recorded as images:DIR, never under a checkpoint's name)")
    if positional and images is None:
        raise ValueError("--positional only applies to --images DIR")
    if images is None and checkpoint is None and policy is None:
        checkpoint = DEFAULT_CHECKPOINT
    if isinstance(checkpoint, str):
        checkpoint = resolve_checkpoint(checkpoint, base)
    elif base is not None and checkpoint is None:
        raise ValueError(f"--base {base}: only a LoRA adapter checkpoint takes a base model, not None")
    elif base is not None:
        raise ValueError(f"evaluate: base {base!r} goes with a CHECKPOINT string; {checkpoint.label} is resolved "
                         f"with its base already (resolve_checkpoint(name, base))")
    if checkpoint is not None:
        checkpoint.check_exists()
    names = _benchmark_names(benchmarks, checkpoint)
    if batch_size is None:  # the mini model is small: large batches are much faster on a CPU
        batch_size = 64 if _is_mini(checkpoint) else 8
    specs = [_with_generation(get_spec(name), generation) for name in names]  # fail early on unknown names
    # a training run or checkpoint directory is recorded (and its images cached) under the adapter it resolves
    # to, so that a run that has trained further is not mistaken for the one evaluated before
    label = checkpoint.label if checkpoint is not None else (f"images:{images}" if images else "policy")
    run_dir = Path(out) if out else Path("runs") / run_name(label)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir}: a file, expected a run directory")
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if images is None and policy is None:
            log(f"loading {label} on {device}")
            policy = load_policy(checkpoint, device=device)
        if images is not None:
            identity = {"kind": "images", "path": str(Path(images).resolve())}
        elif checkpoint is not None:
            # after loading: a hub model's revision is then cached; hashed by rank 0 alone, the same on every process
            identity = shard.on_main(lambda: dict(checkpoint.identity))
        elif identity is None:
            identity = {"kind": "in-process policy", "run_dir": str(run_dir.resolve())}
        results = _run_results(run_dir, label, identity)

        built: dict[tuple[str, str], Scorer] = {}
        for spec in specs:
            all_prompts = load_prompts(spec.prompts)
            prompts_sha256 = prompt_set_sha256(all_prompts)
            prompts = all_prompts[:limit] if limit is not None else all_prompts
            if images is not None:
                root = Path(images)
                if (root / spec.name).is_dir():
                    root = root / spec.name
                files = {i: f for i, f in match_external_images(root, all_prompts, spec.name, positional).items()
                         if i < len(prompts)}
                if not files:
                    raise FileNotFoundError(f"--images {root}: no images of the first {len(prompts)} prompts of "
                                            f"{spec.name}")
                record, images_key = None, None
            else:
                image_set = spec.images_from or spec.name
                if spec.images_from:
                    _check_shared_images(spec, _with_generation(get_spec(spec.images_from), generation))
                root = run_dir / "images" / image_set
                key = image_set_key(identity, image_set, prompts_sha256, spec.generation, label)
                made = generate_images(policy, prompts, root, spec.generation, image_set, key, batch_size=batch_size,
                                       progress=progress, shard=shard)
                if made == 0:
                    log(f"{spec.name}: all {len(prompts) * spec.generation.images_per_prompt} images cached in {root}")
                n = spec.generation.images_per_prompt
                files = {i: [sample_path(root, i, k) for k in range(n)] for i in range(len(prompts))}
                record = spec.generation.record()  # not `generation`: the caller's override for every spec
                images_key = {k: v for k, v in key.items() if k != "checkpoint"}
            key_scorer = (spec.scorer, repr(sorted(spec.scorer_options.items())))
            if scorers and spec.name in scorers:
                scorer = scorers[spec.name]
            else:
                if key_scorer not in built:
                    built[key_scorer] = _build_scorer(spec, device)
                scorer = built[key_scorer]
            score_key = score_cache_key(spec, scorer, files, prompts_sha256, images_key)
            with torch.inference_mode():
                df = score_images(spec, scorer, prompts, files, run_dir / "scores", score_key,
                                  batch_size=batch_size * 2, progress=progress, log=log, shard=shard)
            if not shard.is_main:
                continue  # rank 0 alone aggregates and writes results.json
            metrics = aggregate(df, spec.aggregation, spec.group_by)
            results["benchmarks"][spec.name] = {
                "spec_version": spec.version,
                "scorer": spec.scorer,
                "scorer_version": scorer.version,
                "engine": engine_record(scorer, df),  # engine, version, checkpoint, precision, official
                "scale": list(spec.scale),
                "higher_is_better": spec.higher_is_better,
                "aggregation": spec.aggregation,
                "generation": record,
                "images": str(root),
                "image_matching": None if images is None else ("positional" if positional else "metadata"),
                "limit": limit,
                "n_prompts": len(files),
                "n_prompts_total": len(all_prompts),
                "prompts_sha256": prompts_sha256,
                "prompts_pinned": spec.prompts.format == "python" or bool(spec.prompts.sha256),
                "n_images": int(len(df)),
                "n_nan": int(df["score"].isna().sum()),
                "metrics": {name: m.to_dict() for name, m in metrics.items()},
                "processes": shard.world_size,  # of the run that scored it (images are the same at any count)
            }
            save_results(results, run_dir)
        shard.barrier()
        results = load_results(run_dir)
        return results
    except BaseException:
        if fresh:  # bad input leaves nothing behind: the directories this call made, while still empty
            _remove_empty_dirs(run_dir)
        raise


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the directories below it that hold no file (deepest first); files are never touched."""
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
