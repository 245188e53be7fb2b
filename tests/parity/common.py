"""Shared inputs and helpers of the parity checks (``nox -s parity``; docs/scorers/parity.md).

Imported by the check modules in every environment (ours, the official torch one, the PaddleOCR one), so it
needs only the standard library, numpy and Pillow at import time; torch is imported inside the functions.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
# Sizes chosen to exercise every resize path: square, portrait, landscape (shorter side crop / longest side pad).
IMAGE_SIZES = ((512, 512), (640, 384), (200, 300))
PROMPTS = (
    'a photo of a red cat sitting on a blue "bench"',
    "an astronaut riding a horse &amp; a “curly-quoted” sign, in the style of van gogh",
    "a very long prompt " + " ".join(f"word{i} with many tokens" for i in range(30)),
)

# GenEval evaluation/evaluate_images.py: the colour classes and the three templates of color_classification
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


def seed_everything(seed: int = SEED) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_images(work: Path) -> list[Path]:
    """Deterministic RGB PNGs (smooth gradients, shapes and noise) written once into ``work/images``."""
    from PIL import Image, ImageDraw

    out = work / "images"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    paths = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        path = out / f"{i:02d}.png"
        if not path.is_file():
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + rng.normal(0, 20, (h, w, 3))
            image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
                box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
                draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw.text((w // 8, h // 2), "HELLO 42", fill=(0, 0, 0))
            image.save(path)
        paths.append(path)
    return paths


def load_images(work: Path) -> list[Any]:
    """The PNGs as PIL images (RGB), as the official pipelines open them."""
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in make_images(work)]


def images_tensor(work: Path) -> list[Any]:
    """The PNGs as (1, 3, H, W) float [0, 1] tensors, one per image (our scorers' input; sizes differ)."""
    import torch

    return [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255 for im in load_images(work)]


def perturb_(module: Any, scale: float = 0.02, seed: int = SEED) -> None:
    """Add N(0, scale^2) to every floating-point parameter, in name order, in place.

    Random initialisations leave LayerNorm weights at 1 and biases at 0, which would hide a swapped or dropped
    bias; the perturbation makes every parameter matter. Name order and one generator make it reproducible.
    Buffers are left alone: they are constants of the architecture (causal masks), not weights.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype) * scale)


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_safetensors(path: Path, state_dict: dict[str, Any]) -> None:
    """Contiguous, unshared float32 copies (safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().clone() for k, v in state_dict.items()}, str(path))


def max_abs_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# ------------------------------------------------------------------------------------------ tokenizer files


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable unicode map (the standard GPT-2 table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(bpe_gz: Path, out: Path) -> Path:
    """CLIP's real BPE (``bpe_simple_vocab_16e6.txt.gz``) as transformers ``vocab.json`` + ``merges.txt``.

    Same construction as CLIP's ``SimpleTokenizer``: 48894 merges, vocabulary = 256 byte symbols, the same with
    ``</w>``, one entry per merge, then the two special tokens (49408 in all).
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return out


def clip_tokenizer_dir(work: Path) -> Path:
    """CLIP's real BPE (open_clip's copy) as a transformers fast tokenizer, written once (official side)."""
    out = work / "clip_tokenizer"
    if not (out / "tokenizer.json").is_file():
        import open_clip
        from transformers import CLIPTokenizerFast

        write_clip_tokenizer(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", out)
        CLIPTokenizerFast.from_pretrained(str(out)).save_pretrained(str(out))
    return out


def _words(texts: Iterable[str]) -> list[str]:
    text = " ".join(html.unescape(t).lower() for t in texts)
    return sorted(set(re.findall(r"[a-z]+|\d+", text)))


def write_bert_vocab(out: Path, extra_texts: Iterable[str] = PROMPTS) -> Path:
    """A small WordPiece vocabulary (bert-base-uncased's layout: [PAD]=0, [UNK], [CLS], [SEP], [MASK]) that
    covers the prompts' words, every ASCII character and its ``##`` continuation; enough for random weights."""
    out.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    tokens += [w for w in _words(extra_texts) if w not in tokens]
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return out


@lru_cache(maxsize=1)
def full_size() -> bool:
    """PARITY_FULL=1: the released architectures everywhere (ViT-H-14 HPS/PickScore, ViT-L/14 aesthetic): slow."""
    return os.environ.get("PARITY_FULL", "0") == "1"
