"""The image cache in GenEval's layout, and generation into it with resume.

    <images>/<idx:05d>/metadata.jsonl      the prompt's metadata (one JSON line, as GenEval)
    <images>/<idx:05d>/samples/NNNN.png    one PNG per sample (lossless; never JPEG)
    <images>/generation.json               the settings the images were made with

Every sample has its own seed derived from (seed, image set, prompt index, sample index), so an image
never depends on batching or on which images already exist: a re-run generates only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from flowopd.bench.spec import GenerationSpec
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


def check_image_set(root: Path, key: Mapping[str, Any]) -> None:
    """Refuse to mix images of another key into ``root``; record ``key`` there.

    ``images_per_prompt`` may change: a sample's seed depends on its index alone, so more images per prompt
    extend the set (the existing ones are kept) and fewer use its first ones.
    """
    path = root / "generation.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = {k for k in record if k in old and old[k] != record[k] and k not in _EXTENSIBLE}
        if changed:
            raise ValueError(
                f"{path}: existing images were generated with other settings ({', '.join(sorted(changed))}); "
                f"use another --out directory or delete {root}"
            )
    _atomic_write_bytes(path, (json.dumps(dict(record), indent=2, sort_keys=True) + "\n").encode())


def missing_samples(root: Path, n_prompts: int, images_per_prompt: int) -> list[tuple[int, int]]:
    return [
        (i, k)
        for i in range(n_prompts)
        for k in range(images_per_prompt)
        if not sample_path(root, i, k).is_file()
    ]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_images(
    policy: Policy,
    prompts: Sequence[Mapping[str, Any]],
    root: Path,
    generation: GenerationSpec,
    image_set: str,
    batch_size: int = 8,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """Generate every missing sample of ``prompts`` into ``root``; returns how many were generated."""
    root.mkdir(parents=True, exist_ok=True)
    check_generation_record(root, {**(record or {}), "image_set": image_set, **generation.__dict__})
    write_prompt_metadata(root, prompts)
    todo = missing_samples(root, len(prompts), generation.images_per_prompt)
    if not todo:
        return 0
    bar = tqdm(total=len(todo), desc=f"generate {image_set}", unit="img", disable=not progress)
    for batch in _batches(todo, batch_size):
        texts = [prompts[i]["prompt"] for i, _ in batch]
        seeds = [sample_seed(generation.seed, image_set, i, k) for i, k in batch]
def apply_generation_settings(policy: Policy, generation: GenerationSpec) -> None:
    """Settings that live on the policy rather than in the sampler call: the T5 prompt length of SD3 policies."""
    if generation.max_sequence_length is None:
        return
    if not hasattr(policy, "max_sequence_length"):
        raise ValueError(f"generation.max_sequence_length = {generation.max_sequence_length}: this policy "
                         f"({type(policy).__name__}) has no T5 prompt length to set (SD3 models only)")
    policy.max_sequence_length = generation.max_sequence_length


        cond = policy.encode_prompts(texts)
        noise = policy.initial_noise(seeds, generation.height, generation.width)
        images = sample_ode(policy, cond, noise, generation.steps, generation.guidance_scale)
        for (i, k), image in zip(batch, images):
            save_png(image, sample_path(root, i, k))
        bar.update(len(batch))
    bar.close()
    return len(todo)


def find_external_images(root: Path, n_prompts: int) -> dict[int, list[Path]]:
    """Images generated elsewhere: GenEval folders (``<idx:05d>/samples/*.png``) or ``<idx>.png`` files."""
    found: dict[int, list[Path]] = {}
    for index in range(n_prompts):
        folder = root / f"{index:05d}" / "samples"
        if folder.is_dir():
            files = sorted(folder.glob("*.png"))
        else:
    apply_generation_settings(policy, generation)
            files = [p for p in (root / f"{index:05d}.png", root / f"{index}.png") if p.is_file()][:1]
        if files:
            found[index] = files
    if not found:
        raise FileNotFoundError(
            f"{root}: no images found; expected GenEval folders <idx:05d>/samples/NNNN.png or <idx>.png files"
        )
    return found
