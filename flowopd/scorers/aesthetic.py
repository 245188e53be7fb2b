"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann): 1-10.

Score (METHOD.md s.5, Aesthetic row): ``mlp(e / ||e||)`` where ``e`` is the CLIP ViT-L/14 projected image embedding
(OpenAI weights, here through transformers: "openai/clip-vit-large-patch14") and ``mlp`` is the linear
768 -> 1024 -> 128 -> 64 -> 16 -> 1 head "sac+logos+ava1-l14-linearMSE.pth" (no activations; dropouts inactive).

Official pipeline: christophschuhmann/improved-aesthetic-predictor ``simple_inference.py`` (openai ``clip`` package,
fp16 on CUDA); Flow-GRPO's ``aesthetic_scorer.py`` uses transformers' ``CLIPModel`` + ``CLIPProcessor`` in fp32,
which is what this module reproduces (PIL bicubic shorter side -> 224, centre crop, OpenAI mean/std).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flowopd.scorers.base import Scale, ScoreBatch, check_images
from flowopd.scorers.clip_common import (
    batches,
    clip_pixel_values,
    from_pretrained,
    image_embeddings,
    l2_normalize,
    load_aesthetic_mlp,
    resolve_device,
    url_file,
)
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"
MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
# pinned to the commit of the official repository; the file is a plain state dict (loads with weights_only=True)
MLP_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
    "6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
MLP_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


def aesthetic_from_embeddings(image_embeds: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """The aesthetic score of each row: the head applied to the L2-normalised embedding."""
    return mlp(l2_normalize(image_embeds.float())).squeeze(-1)


class AestheticScorer:
    """LAION aesthetic predictor v2 on (N, 3, H, W) float [0, 1] images; prompts are ignored.

    ``factory`` returns ``(clip, mlp)`` where ``clip`` is a ``CLIPModel`` or ``CLIPVisionModelWithProjection``;
    otherwise ``clip_id`` (hub id or local directory) and ``mlp_path`` (a local ``.pth``/``.safetensors``; default:
    the official file, downloaded from its pinned URL and checked by sha256) are loaded.
    ``engine="official"`` scores with openai's ``clip`` package (ViT-L/14) and the same head instead (in this process
    when installed, else through its server at ``official_url``; see flowopd.scorers.official).
    """

    name = "aesthetic"
    higher_is_better = True
    scale = Scale(1.0, 10.0)

    def __init__(
        self,
        *,
        clip_id: str = DEFAULT_CLIP_ID,
        mlp_path: str | None = None,
        factory: Callable[[], tuple[Any, nn.Module]] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        resize_backend: str = "pil",
        engine: str = "port",
        official_url: str | None = None,
    ) -> None:
        from flowopd.scorers import official

        official.check_engine(self.name, engine)
        self._official = None
        if engine == "official":
            self._official = official.official_or_remote(
                self.name, official_url,
                lambda: official.AestheticPackage(
                    mlp_path or url_file(MLP_URL, MLP_SHA256, MLP_FILENAME, what="aesthetic head", param="mlp_path"),
                    device=device,
                ),
            )
            self.version = self._official.version
            return
        if factory is None:
            from transformers import CLIPVisionModelWithProjection

            path = mlp_path or url_file(MLP_URL, MLP_SHA256, MLP_FILENAME, what="aesthetic head", param="mlp_path")
            mlp = load_aesthetic_mlp(path)
            clip = from_pretrained(
                CLIPVisionModelWithProjection.from_pretrained, clip_id, what="CLIP ViT-L/14 model", param="clip_id"
            )
        else:
            clip, mlp = factory()
        self.device = resolve_device(device)
        self.dtype = dtype
        self.clip = clip.eval().requires_grad_(False).to(device=self.device, dtype=dtype)
        self.mlp = mlp.eval().requires_grad_(False).to(device=self.device, dtype=torch.float32)
        self.batch_size = batch_size
        self.resize_backend = resize_backend
        config = clip.config
        self.image_size = int(getattr(config, "vision_config", config).image_size)
        injected = ";injected" if factory is not None else ""
        head = mlp_path or f"{MLP_FILENAME}@sha256:{MLP_SHA256[:12]}"
        checkpoint = "injected" if factory is not None else f"{clip_id}+{head}"
        self.version = f"code={CODE_VERSION};clip={clip_id};head={head};resize={resize_backend}{injected};" + (
            engine_fields(
                "flowopd-port", f"transformers-{package_version('transformers')}", checkpoint,
                str(dtype).removeprefix("torch."), official=False,
            )
        )

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> ScoreBatch:
        if self._official is not None:
            return self._official.score(images, prompts or [""] * len(images), metadata or [{}] * len(images))
        check_images(images)
        out = [self._score_batch(images[s]) for s in batches(len(images), self.batch_size)]
        return ScoreBatch(np.concatenate(out) if out else np.zeros(0))

    @torch.inference_mode()
    def _score_batch(self, images: torch.Tensor) -> np.ndarray:
        pixel_values = clip_pixel_values(images, self.image_size, backend=self.resize_backend)
        embeds = image_embeddings(self.clip, pixel_values.to(self.device, self.dtype))
        return aesthetic_from_embeddings(embeds, self.mlp).double().cpu().numpy()
