"""``evaluate``: prompts -> generate (resumable image cache) -> score (per-sample rows) -> aggregate.

The same function serves the CLI, the nox table sessions and periodic evaluation during training.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowopd.bench.aggregate import aggregate
from flowopd.bench.images import find_external_images, generate_images, sample_path
from flowopd.bench.results import load_results, new_results, save_results
from flowopd.bench.scoring import score_images
from flowopd.bench.spec import BenchmarkSpec, GenerationSpec, all_specs, get_spec
from flowopd.data import load_prompts
from flowopd.models.loading import DEFAULT_CHECKPOINT, checkpoint_dir, is_mini, load_policy, model_dir
from flowopd.models.policy import Policy
from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer
from flowopd.scorers.engine import engine_record

SD35M_DEFAULT_BENCHMARKS = ("geneval", "ocr", "deqa", "pickscore")


def default_benchmarks(checkpoint: str | None) -> list[str]:
    """Every mini benchmark for mini checkpoints; Table 1's four benchmarks otherwise."""
    if checkpoint is None or is_mini(checkpoint):
        return [name for name, spec in all_specs().items() if spec.scale_name == "mini"]
    return list(SD35M_DEFAULT_BENCHMARKS)


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


def _with_generation(spec: BenchmarkSpec, overrides: Mapping[str, Any] | None) -> BenchmarkSpec:
    if not overrides:
        return spec
    unknown = set(overrides) - set(GenerationSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {sorted(unknown)}")
    return dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, **overrides))


def evaluate(
    checkpoint: str | None = None,
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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a folder of images) on benchmarks; returns the results record.

    ``policy`` and ``scorers`` (benchmark name -> scorer) may be injected (tests, training loops);
    ``generation`` overrides the specs' generation settings (steps, height, width, guidance_scale, ...).
    """
    if images is None and checkpoint is None and policy is None:
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is not None and (resolved := model_dir(checkpoint)) != checkpoint_dir(checkpoint):
        # a training run or checkpoint directory: record (and cache images under) the adapter it resolves to,
        # so that a run that has trained further is not mistaken for the one evaluated before
        checkpoint = str(resolved)
    names = list(benchmarks) if benchmarks else default_benchmarks(checkpoint)
    if batch_size is None:  # the mini model is small: large batches are much faster on a CPU
        batch_size = 64 if checkpoint is None or is_mini(checkpoint) else 8
    specs = [_with_generation(get_spec(name), generation) for name in names]  # fail early on unknown names
    label = checkpoint or (f"images:{images}" if images else "policy")
    run_dir = Path(out) if out else Path("runs") / run_name(label)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = load_results(run_dir)
        if results.get("checkpoint") != label:
            results = new_results(label)
    except FileNotFoundError:
        results = new_results(label)

    built: dict[tuple[str, str], Scorer] = {}
    for spec in specs:
        prompts = load_prompts(spec.prompts)
        if limit is not None:
            prompts = prompts[:limit]
        if images is not None:
            root = Path(images)
            if (root / spec.name).is_dir():
                root = root / spec.name
            files = find_external_images(root, len(prompts))
            record = None
        else:
            image_set = spec.images_from or spec.name
            if spec.images_from:
                _check_shared_images(spec, _with_generation(get_spec(spec.images_from), generation))
            root = run_dir / "images" / image_set
            if policy is None:
                log(f"loading {checkpoint} on {device}")
                policy = load_policy(checkpoint, base=base, device=device)
            made = generate_images(policy, prompts, root, spec.generation, image_set, batch_size=batch_size,
                                   record={"checkpoint": label}, progress=progress)
            if made == 0:
                log(f"{spec.name}: all {len(prompts) * spec.generation.images_per_prompt} images cached in {root}")
            n = spec.generation.images_per_prompt
            files = {i: [sample_path(root, i, k) for k in range(n)] for i in range(len(prompts))}
            record = spec.generation.__dict__  # not `generation`: that is the caller's override for every spec
        key = (spec.scorer, repr(sorted(spec.scorer_options.items())))
        if scorers and spec.name in scorers:
            scorer = scorers[spec.name]
        else:
            if key not in built:
                built[key] = _build_scorer(spec, device)
            scorer = built[key]
        with torch.inference_mode():
            df = score_images(spec, scorer, prompts, files, run_dir / "scores", batch_size=batch_size * 2,
                              progress=progress)
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
            "limit": limit,
            "n_prompts": len(prompts),
            "n_images": int(len(df)),
            "n_nan": int(df["score"].isna().sum()),
            "metrics": {name: m.to_dict() for name, m in metrics.items()},
        }
        save_results(results, run_dir)
    results = load_results(run_dir)
    return results
