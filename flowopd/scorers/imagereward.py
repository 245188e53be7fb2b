"""ImageReward-v1.0 (Xu et al., 2023): BLIP ViT-L image encoder + BERT-base text encoder with cross-attention + head.

Score (METHOD.md s.5, ImageReward row), from the official ``ImageReward/ImageReward.py`` (THUDM/ImageReward):

    image_embeds = ViT-L/16(preprocess(image))                      # all 197 tokens, after the final LayerNorm
    h = BERT(tokens(prompt, max_length=35), cross-attending to image_embeds)[:, 0]   # the [CLS] position
    reward = (mlp(h) - 0.16717362830052426) / 1.0333394966054072   # z-scored, about -2..2

The ``image-reward`` pip package does not run on transformers 5, so the network is rebuilt from transformers' BLIP
parts, which are ports of the same code: ``BlipVisionModel`` = BLIP's timm ViT (pre-norm blocks, fused qkv, GELU,
LayerNorm eps 1e-6, final norm) and ``BlipTextModel`` = BLIP's ``med.py`` BERT (no token-type embeddings,
cross-attention in every layer). :func:`convert_official_state_dict` maps the keys of the official ``ImageReward.pt``
onto it. Preprocessing is the official one: PIL bicubic resize of the shorter side to 224, centre crop, OpenAI CLIP
mean/std; text: ``bert-base-uncased`` WordPiece with BLIP's two extra tokens, padded/truncated to 35 tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flowopd.scorers.base import Scale, ScoreBatch, check_images
from flowopd.scorers.clip_common import (
    MLPHead,
    batches,
    check_prompts,
    clip_pixel_values,
    from_pretrained,
    hub_file,
    load_weights_file,
    resolve_device,
)
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
DEFAULT_TOKENIZER_ID = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35  # the official tokenizer call; not CLIP's 77 (METHOD.md s.5 parity hazards)

# BLIP ViT-L/16 at 224 px (blip.create_vit('large')) and med_config.json with encoder_width = 1024
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
)
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", encoder_hidden_size=1024,
    pad_token_id=0, bos_token_id=None, sep_token_id=None,
)

_BLOCK = re.compile(
    r"blip\.visual_encoder\.blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)
_BLOCK_NAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_PREFIXES = {
    "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
    "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
    "blip.visual_encoder.patch_embed.proj.": "vision.embeddings.patch_embedding.",
    "blip.visual_encoder.norm.": "vision.post_layernorm.",
    "blip.text_encoder.": "text.",
    "mlp.": "head.",
}
# in the checkpoint but not used by the reward: BLIP's contrastive projections and a position-ids buffer
_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|.*position_ids")


def official_key_to_ours(key: str) -> str | None:
    """Our parameter name for an official ``ImageReward.pt`` key; None for keys the reward does not use."""
    if _UNUSED.fullmatch(key):
        return None
    if m := _BLOCK.fullmatch(key):
        return f"vision.encoder.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    for src, dst in _PREFIXES.items():
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"unexpected ImageReward checkpoint key {key!r}")


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``ImageReward.pt`` state dict -> :class:`ImageRewardModel` state dict (renames only)."""
    out = {}
    for key, value in sd.items():
        ours = official_key_to_ours(key)
        if ours is not None:
            out[ours] = value
    return out


class ImageRewardModel(nn.Module):
    """The ImageReward network on transformers' BLIP parts; ``forward`` returns the z-scored reward per row."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = MLPHead(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,  # bidirectional self-attention, as BLIP's text *encoder*
        )
        features = text.last_hidden_state[:, 0]  # official: .float() before the head
        head_dtype = self.head.layers[0].weight.dtype
        return (self.head(features.to(head_dtype)).float().squeeze(-1) - REWARD_MEAN) / REWARD_STD


def imagereward_configs(
    vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None
) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of ImageReward-v1.0, with optional overrides (tests use tiny sizes)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision_config = BlipVisionConfig(**{**VISION_DEFAULTS, **(vision or {})})
    text_kwargs = {**TEXT_DEFAULTS, "encoder_hidden_size": vision_config.hidden_size, **(text or {})}
    # is_decoder=True only makes BlipTextModel build its cross-attention layers; forward runs it as an encoder
    text_config = BlipTextConfig(**text_kwargs, is_decoder=True)
    return vision_config, text_config


def load_imagereward(
    path: str, vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None
) -> ImageRewardModel:
    """An :class:`ImageRewardModel` from an official ``ImageReward.pt`` (or a ``.safetensors`` with its keys)."""
    sd = load_weights_file(path)
    try:
        converted = convert_official_state_dict(sd)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}; is this the ImageReward-v1.0 checkpoint?") from None
    model = ImageRewardModel(*imagereward_configs(vision, text))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit ImageReward-v1.0 (missing {missing[:8]}, unexpected {unexpected[:8]})"
        )
    return model.eval()


def load_imagereward_tokenizer(tokenizer_id: str = DEFAULT_TOKENIZER_ID) -> Any:
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` (as in ``blip.init_tokenizer``)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(
        AutoTokenizer.from_pretrained, tokenizer_id, what="BERT tokenizer", param="tokenizer_id"
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """ImageReward-v1.0 on (N, 3, H, W) float [0, 1] images and one prompt per image.

    ``factory`` returns ``(ImageRewardModel, tokenizer)``; otherwise ``model_id`` (hub repo id holding
    ``ImageReward.pt``, a local directory, or a local ``.pt``/``.safetensors`` file) and ``tokenizer_id`` are loaded.
    ``engine="official"`` scores with the ``image-reward`` package instead (in this process when installed, else
    through its server at ``official_url``; see flowopd.scorers.official); ``med_config`` is then BLIP's config.
    """

    name = "imagereward"
    higher_is_better = True
    scale = Scale(-2.0, 2.0)

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_REPO,
        tokenizer_id: str = DEFAULT_TOKENIZER_ID,
        factory: Callable[[], tuple[ImageRewardModel, Any]] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        resize_backend: str = "pil",
        max_length: int = TEXT_MAX_LENGTH,
        engine: str = "port",
        official_url: str | None = None,
        med_config: str | None = None,
    ) -> None:
        from flowopd.scorers import official

        official.check_engine(self.name, engine)
        self._official = None
        if engine == "official":
            package_model = "ImageReward-v1.0" if model_id == DEFAULT_REPO else model_id
            self._official = official.official_or_remote(
                self.name, official_url, lambda: official.ImageRewardPackage(package_model, med_config, device)
            )
            self.version = self._official.version
            return
        if factory is None:
            path = hub_file(model_id, CHECKPOINT_FILE, what="ImageReward-v1.0 checkpoint", param="model_id")
            model = load_imagereward(path)
            tokenizer = load_imagereward_tokenizer(tokenizer_id)
        else:
            model, tokenizer = factory()
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=dtype)
        self.model.head.float()  # the official head runs on float32 features whatever the encoders' dtype
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.resize_backend = resize_backend
        self.max_length = max_length
        injected = ";injected" if factory is not None else ""
        checkpoint = "injected" if factory is not None else f"{model_id}:{CHECKPOINT_FILE}"
        self.version = (
            f"code={CODE_VERSION};model={model_id}:{CHECKPOINT_FILE};tokenizer={tokenizer_id};"
            f"max_length={max_length};resize={resize_backend}{injected};"
            + engine_fields("flowopd-port", f"transformers-{package_version('transformers')}", checkpoint,
                            str(dtype).removeprefix("torch."), official=False)
        )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> ScoreBatch:
        if self._official is not None:
            return self._official.score(images, prompts, metadata or [{}] * len(images))
        check_images(images)
        prompts = check_prompts(images, prompts)
        out = [self._score_batch(images[s], prompts[s]) for s in batches(len(images), self.batch_size)]
        return ScoreBatch(np.concatenate(out) if out else np.zeros(0))

    @torch.inference_mode()
    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        pixel_values = clip_pixel_values(images, self.model.image_size, backend=self.resize_backend)
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        rewards = self.model(pixel_values.to(self.device, self.dtype), text["input_ids"], text["attention_mask"])
        return rewards.double().cpu().numpy()
