"""PickScore_v1 (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

Score (METHOD.md s.5, PickScore row): ``logit_scale.exp() * cosine(text_embedding, image_embedding)``, about
18-24 on SD3.5-M images. Native scale; the ``/26`` reward normalisation lives in the reward adapter.

Official pipeline (PickScore README, Flow-GRPO ``pickscore_scorer.py``): ``CLIPModel`` "yuvalkirstain/PickScore_v1",
``CLIPProcessor`` "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" (PIL bicubic resize of the shorter side to 224, centre
crop, OpenAI mean/std; text padded to the longest prompt, truncated to 77 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import Scale, ScoreBatch, check_images
from flowopd.scorers.clip_common import (
    batches,
    check_prompts,
    clip_pixel_values,
    from_pretrained,
    image_embeddings,
    paired_cosine,
    resolve_device,
    text_embeddings,
)
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_MODEL_ID = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore_from_embeddings(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """``exp(logit_scale) * cos(text_i, image_i)`` per row (``logit_scale`` is the stored log value)."""
    return logit_scale.float().exp() * paired_cosine(text_embeds, image_embeds)


class PickScoreScorer:
    """PickScore_v1 on (N, 3, H, W) float [0, 1] images and one prompt per image.

    ``factory`` (tests, custom weights) returns ``(clip_model, tokenizer)``; otherwise ``model_id`` (hub id or local
    directory) and ``processor_id`` (the tokenizer's hub id or local directory) are loaded with transformers.
    """

    name = "pickscore"
    higher_is_better = True
    scale = Scale(18.0, 24.0)

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        processor_id: str = DEFAULT_PROCESSOR_ID,
        factory: Callable[[], tuple[Any, Any]] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        resize_backend: str = "pil",
        max_length: int = 77,
    ) -> None:
        if factory is None:
            from transformers import AutoTokenizer, CLIPModel

            model = from_pretrained(CLIPModel.from_pretrained, model_id, what="PickScore model", param="model_id")
            tokenizer = from_pretrained(
                AutoTokenizer.from_pretrained, processor_id, what="PickScore processor", param="processor_id"
            )
        else:
            model, tokenizer = factory()
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=dtype)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.resize_backend = resize_backend
        self.max_length = max_length
        self.image_size = int(model.config.vision_config.image_size)
        injected = ";injected" if factory is not None else ""
        checkpoint = "injected" if factory is not None else model_id
        self.version = (
            f"code={CODE_VERSION};model={model_id};processor={processor_id};resize={resize_backend}{injected};"
            + engine_fields("flowopd-port", f"transformers-{package_version('transformers')}", checkpoint,
                            str(dtype).removeprefix("torch."), official=False)
        )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> ScoreBatch:
        check_images(images)
        prompts = check_prompts(images, prompts)
        out = [self._score_batch(images[s], prompts[s]) for s in batches(len(images), self.batch_size)]
        return ScoreBatch(np.concatenate(out) if out else np.zeros(0))

    @torch.inference_mode()
    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        pixel_values = clip_pixel_values(images, self.image_size, backend=self.resize_backend)
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        image_embeds = image_embeddings(self.model, pixel_values.to(self.device, self.dtype))
        text_embeds = text_embeddings(self.model, text["input_ids"], text.get("attention_mask"))
        scores = pickscore_from_embeddings(text_embeds, image_embeds, self.model.logit_scale)
        return scores.double().cpu().numpy()
