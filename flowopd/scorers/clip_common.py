"""Shared pieces of the CLIP-family scorers (PickScore, Aesthetic, HPS, ImageReward): one stack, transformers only.

- image preprocessing on (N, 3, H, W) float [0, 1] tensors: shortest side -> ``size`` (bicubic) + centre crop, or
  longest side -> ``size`` + pad (open_clip's ``ResizeMaxSize``, used by HPS v2), then CLIP mean/std normalisation;
- embedding helpers that work with transformers 4.x (tensors) and 5.x (``ModelOutput``) return types;
- the 768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear head shared by the LAION aesthetic predictor and ImageReward;
- loading helpers that turn "offline / not cached" into an error naming the model id and the local-path option.

Resizing backends (the "PIL vs tensor resizing" parity hazard of METHOD.md s.5):
``"pil"`` rounds to uint8 and resizes with PIL bicubic, exactly what ``CLIPImageProcessor`` (transformers 4.x) and
torchvision's ``Resize`` on a PIL image do, so PickScore, Aesthetic and ImageReward match their official pipelines;
``"tensor"`` uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, which is what torchvision's
``Resize`` does on a tensor (HPS v2 resizes after ``ToTensor``), and runs on the GPU.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowopd.scorers.base import check_images, to_uint8_hwc

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------- preprocessing


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = ``size`` and the longer one truncated, as torchvision and HF do."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to ``size`` x ``size`` with torchvision's offsets (``round((H - size) / 2)``)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} images to {size}x{size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Snap [0, 1] floats to the uint8 grid, as saving a PNG and ``ToTensor`` do."""
    return (images.clamp(0, 1) * 255).round() / 255


def resize_shortest_center_crop(images: torch.Tensor, size: int, *, backend: str = "pil") -> torch.Tensor:
    """Shorter side -> ``size`` (bicubic), centre crop; returns float32 [0, 1] of shape (N, 3, size, size)."""
    check_images(images)
    h, w = images.shape[-2:]
    new_h, new_w = shortest_side_size(h, w, size)
    if backend == "pil":
        from PIL import Image

        out = []
        for arr in to_uint8_hwc(images):
            pil = Image.fromarray(arr)
            if pil.size != (new_w, new_h):
                pil = pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(pil).copy()))
        resized = torch.stack(out).permute(0, 3, 1, 2).float() / 255
    elif backend == "tensor":
        x = quantize_uint8(images.float())
        if (new_h, new_w) != (h, w):
            # clamp: PIL's uint8 output cannot overshoot the way float bicubic does
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        resized = x
    else:
        raise ValueError(f"backend must be 'pil' or 'tensor', got {backend!r}")
    return center_crop(resized, size)


def resize_longest_pad(images: torch.Tensor, size: int, *, fill: float = 0.0, antialias: bool = True) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize`` on tensors (HPS v2 ``preprocess_val``): longer side -> ``size``, pad to square.

    The official pipeline runs ``ToTensor`` first, so torchvision resizes a float tensor: bicubic, antialiased on
    torchvision >= 0.17 (``antialias=False`` reproduces torchvision <= 0.16), not clamped. Padding splits the
    remainder as ``pad // 2`` before and the rest after, with ``fill`` (0 = black, before normalisation).
    """
    check_images(images)
    x = quantize_uint8(images.float())
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    new_h, new_w = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_pixel_values(
    images: torch.Tensor,
    size: int,
    *,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
    resize: str = "shortest_crop",
    backend: str = "pil",
    antialias: bool = True,
) -> torch.Tensor:
    """CLIP ``pixel_values`` (float32, (N, 3, size, size)) from (N, 3, H, W) float [0, 1] images.

    ``resize="shortest_crop"`` is CLIP's Resize + CenterCrop (``backend`` "pil" or "tensor");
    ``resize="longest_pad"`` is open_clip's ResizeMaxSize (always on tensors, as in HPS v2).
    """
    if resize == "shortest_crop":
        x = resize_shortest_center_crop(images, size, backend=backend)
    elif resize == "longest_pad":
        x = resize_longest_pad(images, size, antialias=antialias)
    else:
        raise ValueError(f"resize must be 'shortest_crop' or 'longest_pad', got {resize!r}")
    return normalize(x.float(), mean, std)


# ----------------------------------------------------------------------------------------------- embeddings


def _pooled(output: Any, *names: str) -> torch.Tensor:
    """A tensor from a transformers return value: 4.x returns tensors, 5.x a ModelOutput (projected pooler_output)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in names:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"expected a tensor or an output with one of {names}, got {type(output).__name__}")


def image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings of a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (not normalised)."""
    if hasattr(model, "get_image_features"):
        return _pooled(model.get_image_features(pixel_values=pixel_values), "pooler_output", "image_embeds")
    return _pooled(model(pixel_values=pixel_values), "image_embeds")


def text_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected text embeddings of a ``CLIPModel`` (not normalised)."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return _pooled(out, "pooler_output", "text_embeds")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 along the last dimension (no epsilon, as the official scorers do)."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) batches: the diagonal of ``normalize(a) @ normalize(b).T``."""
    return (l2_normalize(a.float()) * l2_normalize(b.float())).sum(-1)


# ----------------------------------------------------------------------------------------------- heads


class MLPHead(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, dropouts 0.2/0.2/0.1 (inactive in eval).

    The head of the LAION aesthetic predictor v2 and of ImageReward; its ``layers.{0,2,4,6,7}`` keys are the
    official checkpoints' keys.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------------------------- loading


def offline_hint(model_id: str, param: str) -> str:
    """How to get ``model_id`` when it is not in the local cache."""
    return (
        f"If you are offline (HF_HUB_OFFLINE=1 or no network), download it once where there is network "
        f"(`hf download {model_id}`) so that it is in the Hugging Face cache, or pass a local copy: "
        f"{param}='/path/to/local/dir'."
    )


def from_pretrained(loader: Callable[..., Any], model_id: str, *, what: str, param: str, **kwargs: Any) -> Any:
    """``loader(model_id, **kwargs)`` (a ``from_pretrained``) with a clear error when the files cannot be had."""
    try:
        return loader(model_id, **kwargs)
    except OSError as e:
        raise OSError(f"could not load the {what} {model_id!r}: {e}\n{offline_hint(model_id, param)}") from e


def hub_file(repo_or_path: str, filename: str, *, what: str, param: str) -> str:
    """A local file: ``repo_or_path`` itself if it is a file, ``<dir>/filename`` if a directory, else the Hub."""
    path = Path(repo_or_path)
    if path.is_file():
        return str(path)
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path}: no {filename} in this directory (the {what}); pass the file itself")
        return str(path / filename)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_or_path, filename)
    except OSError as e:
        raise OSError(
            f"could not load the {what} {repo_or_path!r} (file {filename}): {e}\n"
            f"{offline_hint(repo_or_path, param).replace('/path/to/local/dir', '/path/to/' + filename)}"
        ) from e


def url_file(url: str, sha256: str, filename: str, *, what: str, param: str) -> str:
    """A verified local copy of a file pinned by URL + sha256, cached under ``<cache>/weights/``."""
    from flowopd.data import cache_root, sha256_file

    cached = cache_root() / "weights" / filename
    if cached.is_file():
        actual = sha256_file(cached)
        if actual != sha256:
            raise ValueError(f"{cached}: sha256 mismatch (expected {sha256}, got {actual}); delete it to re-download")
        return str(cached)
    hint = f"download {url} yourself and pass {param}='/path/to/{filename}'"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise OSError(f"the {what} is not cached at {cached} and HF_HUB_OFFLINE is set: {hint}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise OSError(f"could not download the {what} from {url} ({e}): {hint}") from e
    actual = hashlib.sha256(payload).hexdigest()
    if actual != sha256:
        raise ValueError(f"{url}: sha256 mismatch (expected {sha256}, got {actual})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, cached)
    return str(cached)


def load_weights_file(path: str) -> dict[str, Any]:
    """A checkpoint as a dict: ``.safetensors`` directly, anything else with ``torch.load(weights_only=True)``.

    Never unpickles arbitrary objects: a checkpoint that needs custom classes fails with a message that says how
    to convert it once (in the official package's environment) to safetensors.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError depending on the version
        raise ValueError(
            f"{path}: not loadable with torch.load(weights_only=True) ({e}). It holds more than tensors; convert it "
            f"once where its original code is installed: safetensors.torch.save_file(state_dict, 'x.safetensors'), "
            f"then pass the .safetensors path"
        ) from e


def load_aesthetic_mlp(path: str) -> MLPHead:
    """The aesthetic head from a ``.pth`` (official ``layers.N.weight`` keys) or ``.safetensors`` file (here, below
    both the port in ``aesthetic.py`` and the official engine in ``official.py``, which load the same file)."""
    state = load_weights_file(path)
    mlp = MLPHead(int(state["layers.0.weight"].shape[1]) if "layers.0.weight" in state else 768)
    missing, unexpected = mlp.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not an aesthetic-predictor head (missing keys {missing}, unexpected {unexpected})")
    return mlp.eval()


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_prompts(images: torch.Tensor, prompts: Any) -> list[str]:
    """One prompt per image, as a list of str."""
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    return [str(p) for p in prompts]
