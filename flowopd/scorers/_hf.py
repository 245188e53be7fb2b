"""Small helpers shared by the transformers-based scorers.

- ``load_pretrained``: ``from_pretrained`` by official hub id or local path, with an error that names the
  model id and says how to point at a local copy when the hub cannot be reached;
- ``resolve_device``: ``None`` means CUDA when available, else CPU;
- CLIP-style preprocessing (shortest side -> ``size`` bicubic, centre crop, normalise) done with PIL as
  open_clip / torchvision and transformers' CLIPImageProcessor do (PIL's antialiased bicubic), without
  torchvision; the two libraries differ only in how they round an odd centre-crop margin (``crop_rounding``);
- ``pooled``: transformers >= 5 returns a ModelOutput from ``get_image_features``/``get_text_features``
  (projected embedding in ``pooler_output``), 4.x returns the tensor; accept both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from flowopd.scorers.base import to_uint8_hwc

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(OSError):
    """A model that could not be loaded; the message names the model id and how to use a local copy."""


def load_pretrained(cls: Any, model_id: str, *, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model_id, **kwargs)``, re-raising loading failures with a clear message.

    ``what`` names the role ("GenEval colour classifier") so the error says which scorer option to change.
    """
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as e:  # hub unreachable, file missing, offline mode: all OSError subclasses
        raise ModelLoadError(
            f"could not load the {what} {model_id!r} with {getattr(cls, '__name__', cls)}.from_pretrained "
            f"({type(e).__name__}: {e}). Without network access, download it on a connected machine "
            f"(`huggingface-cli download {model_id} --local-dir DIR`) and pass the directory as the model id "
            f"(e.g. model_id='DIR'), or pre-fill the Hugging Face cache and set HF_HUB_OFFLINE=1."
        ) from e


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_pil_images(images: torch.Tensor | Sequence[Image.Image]) -> list[Image.Image]:
    """(N, 3, H, W) float [0, 1] tensor (quantised to uint8 as a saved PNG would be) or PIL images -> RGB PIL."""
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(a) for a in to_uint8_hwc(images)]
    return [im.convert("RGB") for im in images]


def resize_shortest_side(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so the shorter side is ``size``; the longer is ``int(size * long / short)`` (torchvision, HF)."""
    w, h = image.size
    if min(w, h) == size:  # torchvision returns the image untouched in this case
        return image
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int, rounding: Literal["torchvision", "hf"] = "torchvision") -> Image.Image:
    """Central ``size`` x ``size`` crop of an image at least that large.

    torchvision (open_clip) offsets by ``int(round(margin / 2))`` (half to even), transformers by
    ``margin // 2``: they differ by one pixel when the margin is odd.
    """
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}x{size}")
    if rounding == "torchvision":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    elif rounding == "hf":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        raise ValueError(f"center_crop: rounding must be 'torchvision' or 'hf', got {rounding!r}")
    return image.crop((left, top, left + size, top + size))


def clip_preprocess(
    images: torch.Tensor | Sequence[Image.Image],
    size: int = 224,
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    crop_rounding: Literal["torchvision", "hf"] = "torchvision",
) -> torch.Tensor:
    """CLIP pixel values (N, 3, size, size) float32: shortest side -> size (PIL bicubic), centre crop, normalise.

    Matches open_clip's eval transform (Resize(size, BICUBIC), CenterCrop, ToTensor, Normalize) with the
    default ``crop_rounding``; ``crop_rounding="hf"`` matches transformers' CLIPImageProcessor.
    """
    pil = to_pil_images(images)
    if not pil:
        return torch.zeros(0, 3, size, size)
    arrays = [np.asarray(center_crop(resize_shortest_side(im, size), size, crop_rounding)) for im in pil]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def pooled(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_image_features``/``get_text_features`` (tensor or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "pooler_output", None) is not None:
        return output.pooler_output
    raise TypeError(f"expected a tensor or a ModelOutput with pooler_output, got {type(output).__name__}")
