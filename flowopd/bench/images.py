"""The image cache in GenEval's layout, and generation into it with resume.

    <images>/<idx:05d>/metadata.jsonl      the prompt's metadata (one JSON line, as GenEval)
    <images>/<idx:05d>/samples/NNNN.png    one PNG per sample (lossless; never JPEG)
    <images>/generation.json               what the images were made by and with (:func:`image_set_key`)

Every sample has its own seed derived from (seed, image set, prompt index, sample index) and is made in the
batch of a fresh run with the same batch size, so an image depends neither on which images already exist nor on
how many processes made them: a re-run generates only the batches with a missing sample.
An image set holds the images of one key only - the checkpoint's identity (flowopd.models.loading.
Checkpoint.identity), the prompt set's sha256 and every generation setting; a run directory holding another
is refused, naming both sides.

Images generated elsewhere (``--images DIR``) are matched to the benchmark's prompts through each folder's
``metadata.jsonl`` (:func:`match_external_images`), or by position only when the user asks for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from flowopd.bench.distributed import SINGLE, Shard, pending_batches
from flowopd.bench.spec import GenerationSpec
from flowopd.models.loading import identity_summary
from flowopd.models.policy import Policy
from flowopd.sampling import sample_ode


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names it."""


def sample_seed(seed: int, image_set: str, index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}/{image_set}/{index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_path(root: Path, index: int, sample: int) -> Path:
    return root / f"{index:05d}" / "samples" / f"{sample:04d}.png"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_png(image: torch.Tensor, path: Path) -> None:
    """Save a (3, H, W) float [0, 1] image as PNG, atomically (a crash never leaves a half file)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    """(3, H, W) float [0, 1] RGB; a file that does not decode raises CorruptImageError naming it."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"corrupt image {path}: {e}; delete it and re-run to regenerate it"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def write_prompt_metadata(root: Path, prompts: Sequence[Mapping[str, Any]]) -> None:
    for index, meta in enumerate(prompts):
        path = root / f"{index:05d}" / "metadata.jsonl"
        line = json.dumps(dict(meta), sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != line:
            _atomic_write_bytes(path, line.encode())


#: generation settings that select how many samples exist, never what any one sample is
_EXTENSIBLE = frozenset({"images_per_prompt"})


def image_set_key(
    identity: Mapping[str, Any], image_set: str, prompts_sha256: str, generation: GenerationSpec, label: str
) -> dict[str, Any]:
    """Everything an image set's pixels depend on: the checkpoint identity, the image set name (it seeds the
    samples), the prompt set's sha256 and every generation setting (all fields of GenerationSpec, whatever they
    are). ``label`` (the CHECKPOINT as the user wrote it) is recorded, not compared."""
    return {"checkpoint": label, "identity": dict(identity), "image_set": image_set,
            "prompts_sha256": prompts_sha256, "generation": generation.record()}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def key_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``field: old -> new`` for every leaf that differs (``path`` leaves and ``ignore`` never count: a model
    copied elsewhere is the same model)."""
    a, b = _flat(old), _flat(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or k.rsplit(".", 1)[-1] == "path" or a.get(k, "<absent>") == b.get(k, "<absent>"):
            continue
        diffs.append(f"{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}")
    return diffs


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _summarised(key: Mapping[str, Any]) -> dict[str, Any]:
    """An image-set key with its checkpoint identity as one comparable string (a difference reads as two models,
    not as a list of weight files)."""
    return {**key, "identity": identity_summary(dict(key.get("identity") or {}))}


def check_image_set(root: Path, key: Mapping[str, Any]) -> None:
    """Refuse to mix images of another key into ``root``; record ``key`` there.

    ``images_per_prompt`` may change: a sample's seed depends on its index alone, so more images per prompt
    extend the set (the existing ones are kept) and fewer use its first ones.
    """
    path = root / "generation.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        new_label = key.get("checkpoint")
        if not isinstance(old, dict) or "identity" not in old:
            raise ValueError(
                f"{root}: images made before image sets recorded what made them (no checkpoint identity in "
                f"{path.name}); they cannot be attributed to {new_label}: pass a new --out directory, or delete "
                f"{root} to regenerate them (their scores are re-made too)")
        ignore = frozenset({"checkpoint", *(f"generation.{k}" for k in _EXTENSIBLE)})
        changed = key_differences(_summarised(old), _summarised(key), ignore=ignore)
        if changed:
            fields = ", ".join(d.split(":", 1)[0].removeprefix("generation.") for d in changed)
            raise ValueError(
                f"{root}: existing images were made with other settings ({fields}) by {old.get('checkpoint')}, "
                f"not by {new_label} as asked: {'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}. "
                f"Pass a new --out directory, or delete {root} to regenerate them (their scores are re-made too)")
    _atomic_write_bytes(path, (json.dumps(dict(key), indent=2, sort_keys=True) + "\n").encode())


def missing_samples(root: Path, n_prompts: int, images_per_prompt: int) -> list[tuple[int, int]]:
    return [
        (i, k)
        for i in range(n_prompts)
        for k in range(images_per_prompt)
        if not sample_path(root, i, k).is_file()
    ]


def apply_generation_settings(policy: Policy, generation: GenerationSpec) -> None:
    """Settings that live on the policy rather than in the sampler call: the T5 prompt length of SD3 policies."""
    if generation.max_sequence_length is None:
        return
    if not hasattr(policy, "max_sequence_length"):
        raise ValueError(f"generation.max_sequence_length = {generation.max_sequence_length}: this policy "
                         f"({type(policy).__name__}) has no T5 prompt length to set (SD3 models only)")
    policy.max_sequence_length = generation.max_sequence_length


def generate_images(
    policy: Policy,
    prompts: Sequence[Mapping[str, Any]],
    root: Path,
    generation: GenerationSpec,
    image_set: str,
    key: Mapping[str, Any],
    batch_size: int = 8,
    progress: bool = True,
    shard: Shard = SINGLE,
) -> int:
    """Generate every missing sample of ``prompts`` into ``root`` (whose images must be of ``key``, see
    :func:`image_set_key`); returns how many were missing. The batches are those of a fresh run (the ones holding
    a missing sample are made whole, only the missing samples saved), dealt to the processes of ``shard``; rank 0
    checks the set and lists what is missing (flowopd.bench.distributed)."""

    def missing() -> list[tuple[int, int]]:
        root.mkdir(parents=True, exist_ok=True)
        check_image_set(root, key)
        write_prompt_metadata(root, prompts)
        return missing_samples(root, len(prompts), generation.images_per_prompt)

    todo = shard.on_main(missing)
    if not todo:
        return 0
    apply_generation_settings(policy, generation)
    every = [(i, k) for i in range(len(prompts)) for k in range(generation.images_per_prompt)]
    missing_now = set(todo)
    mine = shard.share(pending_batches(every, batch_size, missing_now))
    bar = tqdm(total=sum(t in missing_now for b in mine for t in b), desc=f"generate {image_set}", unit="img",
               disable=not progress)
    for batch in mine:
        texts = [prompts[i]["prompt"] for i, _ in batch]
        seeds = [sample_seed(generation.seed, image_set, i, k) for i, k in batch]
        cond = policy.encode_prompts(texts)
        noise = policy.initial_noise(seeds, generation.height, generation.width)
        images = sample_ode(policy, cond, noise, generation.steps, generation.guidance_scale)
        kept = [(i, k, image) for (i, k), image in zip(batch, images) if (i, k) in missing_now]
        for i, k, image in kept:
            save_png(image, sample_path(root, i, k))
        bar.update(len(kept))
    bar.close()
    shard.barrier()  # every image exists before any process scores them
    return len(todo)


def _external_metadata(folder: Path) -> dict[str, Any] | str:
    """The metadata object of an external GenEval folder, or why there is none."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return f"{path}: missing"
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        meta = json.loads(lines[0]) if lines else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path}: not a JSON line ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        return f"{path}: expected an object with a string 'prompt'"
    return meta


def _index_of(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def match_external_images(
    root: Path,
    prompts: Sequence[Mapping[str, Any]],
    benchmark: str,
    positional: bool = False,
) -> dict[int, list[Path]]:
    """Images generated elsewhere, as benchmark prompt index -> sample files.

    Layouts: GenEval folders (``<idx>/metadata.jsonl`` + ``<idx>/samples/*.png``) or ``<idx>.png`` files. Each
    folder is matched to the benchmark prompt whose text and metadata fields (every field of the benchmark's row:
    what its scorer may read) its ``metadata.jsonl`` holds; a folder without metadata, with a prompt the benchmark
    does not have or with a field that disagrees is refused, naming the first one. ``positional=True`` (the user's
    explicit choice) scores folder or file ``i`` against prompt ``i`` instead, without reading any metadata.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such directory")
    entries: dict[int, list[Path]] = {}
    folders: dict[int, Path] = {}
    for child in sorted(root.iterdir()):
        index = _index_of(child.stem if child.suffix == ".png" else child.name)
        if index is None:
            continue
        if child.is_dir() and (child / "samples").is_dir():
            files = sorted((child / "samples").glob("*.png"))
            if files:
                entries[index], folders[index] = files, child
        elif child.is_file() and child.suffix == ".png":
            entries.setdefault(index, [child])
    if not entries:
        raise FileNotFoundError(
            f"--images {root}: no images found; expected GenEval folders <idx:05d>/metadata.jsonl + "
            f"<idx:05d>/samples/NNNN.png (or <idx>.png files with --positional)")
    if positional:
        return {i: files for i, files in sorted(entries.items()) if i < len(prompts)}
    by_text: dict[str, list[int]] = {}
    for i, row in enumerate(prompts):
        by_text.setdefault(row["prompt"], []).append(i)
    found: dict[int, list[Path]] = {}
    for index, files in sorted(entries.items()):
        where = folders.get(index)
        meta = _external_metadata(where) if where is not None else f"{files[0]}: no metadata.jsonl beside it"
        if isinstance(meta, str):
            raise ValueError(f"--images: {meta}; cannot tell which prompt of {benchmark} these images show "
                             f"(pass --positional to score image set i against prompt i)")
        candidates = by_text.get(meta["prompt"], [])
        if not candidates:
            raise ValueError(f"--images: {where / 'metadata.jsonl'}: prompt {meta['prompt']!r} is not a prompt "
                             f"of {benchmark} (images of another benchmark or prompt file?)")
        agree = [i for i in candidates if all(meta.get(k, "<missing>") == v for k, v in prompts[i].items())]
        if not agree:
            row = prompts[candidates[0]]
            k = next(k for k, v in row.items() if meta.get(k, "<missing>") != v)
            raise ValueError(f"--images: {where / 'metadata.jsonl'}: field {k!r} is {_short(meta.get(k, '<missing>'))}"
                             f" there but {_short(row[k])} in {benchmark} (prompt {candidates[0]}, "
                             f"{_short(row['prompt'])})")
        free = [i for i in agree if i not in found]
        if not free:
            raise ValueError(f"--images: {where}: a second folder for prompt {agree[0]} of {benchmark} "
                             f"({_short(meta['prompt'])})")
        found[index if index in free else free[0]] = files
    return dict(sorted(found.items()))
