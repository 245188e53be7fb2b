"""HPS v2.1 (Human Preference Score v2, Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Score (METHOD.md s.5, HPS v2.1 row): ``cosine(image_embedding, text_embedding)`` *without* the logit scale, about
0.25-0.35 (the HPS paper prints it x100). Native scale, no normalisation here.

The checkpoint ("xswu/HPSv2", file ``HPS_v2.1_compressed.pt``) is an open_clip state dict under ``"state_dict"``.
We do not use open_clip (it pulls torchvision): :func:`convert_open_clip_state_dict` maps it onto transformers'
``CLIPModel``. The two architectures are the same network for ViT-H-14 (pre-norm blocks, exact GELU, class-token
pooling with ``ln_post`` then ``proj``, causal text attention pooled at the end-of-text token, no attentional pooler),
so the conversion is exact up to float rounding.

Preprocessing is HPS v2's ``preprocess_val`` (``light_augmentation=True``): ``ToTensor``, open_clip's
``ResizeMaxSize(224)`` (longer side -> 224 bicubic on the *tensor*, pad to square with 0), OpenAI mean/std.
The tokenizer is CLIP's BPE with 77 tokens, after open_clip's text cleaning (:func:`open_clip_clean`; ``ftfy`` is
used when installed, as open_clip does). open_clip pads with 0 and transformers with its pad token: the causal mask
makes the end-of-text features independent of what follows, so both give the same embedding.

Beware: the ``hpsv2`` pip package's ``hpsv2.score`` defaults to ``hps_version="v2.0"``; the Flow-OPD paper reports
v2.1, which is our default.
"""

from __future__ import annotations

import html
import importlib.util
import re
import warnings
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
    hub_file,
    image_embeddings,
    load_weights_file,
    paired_cosine,
    resolve_device,
    text_embeddings,
)
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# open_clip/model_configs/ViT-H-14.json (as shipped in tgxs002/HPSv2)
OPEN_CLIP_VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# open_clip options that change the network in ways transformers' CLIPModel cannot express
PRECISIONS = ("auto", "fp32", "amp")
_UNSUPPORTED = ("ls_init_value", "attentional_pool", "global_average_pool", "input_patchnorm", "timm_model_name",
                "hf_model_name", "attn_pooler_queries", "pool_type", "no_ln_pre", "final_ln_after_pool")


def _has_ftfy() -> bool:
    return importlib.util.find_spec("ftfy") is not None


def open_clip_clean(text: str) -> str:
    """open_clip's cleaning before BPE: ``ftfy.fix_text`` (if installed), HTML-unescape twice, collapse whitespace.

    transformers' CLIP tokenizer only NFC-normalises, collapses whitespace and lowercases; without this step,
    prompts with HTML entities, curly quotes or mojibake would be tokenised differently from HPS's open_clip.
    """
    if _has_ftfy():
        import ftfy

        text = ftfy.fix_text(text)
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def clip_config_from_open_clip(cfg: Mapping[str, Any], *, eos_token_id: int = 49407, bos_token_id: int = 49406) -> Any:
    """A transformers ``CLIPConfig`` equivalent to an open_clip model config (``model_configs/*.json`` format)."""
    from transformers import CLIPConfig

    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    for part, name in ((vision, "vision_cfg"), (text, "text_cfg")):
        bad = [k for k in _UNSUPPORTED if part.get(k) not in (None, False, "tok", "argmax")]
        if bad:
            raise ValueError(f"open_clip {name} options {bad} have no equivalent in transformers' CLIPModel")
        if isinstance(part.get("layers"), (list, tuple)):
            raise ValueError(f"open_clip {name}: ResNet towers (layers={part['layers']}) are not supported")
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = int(vision["width"]), int(text["width"])
    return CLIPConfig(
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
            num_hidden_layers=int(vision["layers"]),
            num_attention_heads=v_width // int(vision.get("head_width", 64)),
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=int(text["vocab_size"]),
            hidden_size=t_width,
            intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
            num_hidden_layers=int(text["layers"]),
            num_attention_heads=int(text["heads"]),
            max_position_embeddings=int(text["context_length"]),
            hidden_act=act,
            layer_norm_eps=1e-5,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        ),
        projection_dim=int(cfg["embed_dim"]),
    )


def _convert_block(src: str, dst: str, sd: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> set[str]:
    """One open_clip residual attention block -> one transformers ``CLIPEncoderLayer``."""
    q, k, v = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
    out.update({
        dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
        dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb,
    })
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for a, b in renames.items():
        for p in ("weight", "bias"):
            out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    used = {src + "attn.in_proj_weight", src + "attn.in_proj_bias"}
    return used | {f"{src}{a}.{p}" for a in renames for p in ("weight", "bias")}


def convert_open_clip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` (ViT tower, built-in text tower) state dict -> transformers ``CLIPModel`` state dict.

    ``in_proj_weight``/``in_proj_bias`` are split into q/k/v; ``visual.proj`` and ``text_projection`` (used as
    ``x @ proj``) are transposed into ``nn.Linear`` weights. Every source key must be consumed: an unknown key
    (LayerScale, attentional pooler, a custom text tower...) raises instead of being dropped silently.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    direct = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for a, b in direct.items():
        out[b] = sd[a]
        used.add(a)
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    used |= {"visual.proj", "text_projection"}
    for src_prefix, dst_prefix in (
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
        ("transformer.resblocks.", "text_model.encoder.layers."),
    ):
        n_layers = 1 + max(int(k[len(src_prefix):].split(".")[0]) for k in sd if k.startswith(src_prefix))
        for i in range(n_layers):
            used |= _convert_block(f"{src_prefix}{i}.", f"{dst_prefix}{i}.", sd, out)
    unknown = sorted(set(sd) - used - {"attn_mask", "visual.attn_mask"})
    if unknown:
        raise ValueError(f"open_clip state dict has keys with no CLIPModel equivalent: {unknown[:10]}")
    return out


def load_hps_clip(path: str, open_clip_config: Mapping[str, Any] = OPEN_CLIP_VIT_H_14, **config_kwargs: Any) -> Any:
    """A transformers ``CLIPModel`` holding an HPS checkpoint (``{"state_dict": ...}`` or a bare state dict)."""
    from transformers import CLIPModel

    checkpoint = load_weights_file(path)
    sd = checkpoint.get("state_dict", checkpoint)
    if any(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = CLIPModel(clip_config_from_open_clip(open_clip_config, **config_kwargs))
    converted = convert_open_clip_state_dict(sd)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: converted HPS weights do not fit CLIPModel (missing {missing}, unexpected {unexpected})"
        )
    return model.float().eval()


class HPSScorer:
    """HPS v2.x on (N, 3, H, W) float [0, 1] images and one prompt per image.

    ``factory`` returns ``(clip_model, tokenizer)``; otherwise ``model_id`` (a hub repo id holding
    ``HPS_FILES[hps_version]``, a local directory, or a local ``.pt``/``.safetensors`` file) is converted and
    ``tokenizer_id`` (CLIP BPE: hub id or a local directory with vocab.json + merges.txt) is loaded.

    ``precision``: ``"auto"`` (default) is the release's: fp16 autocast on CUDA (hpsv2 builds with
    ``precision="amp"`` and scores under ``torch.cuda.amp.autocast()``), fp32 on CPU; ``"fp32"`` or ``"amp"`` force one.
    ``engine="official"`` scores with the ``hpsv2`` package instead (in this process when installed, else through
    its server at ``official_url``; see flowopd.scorers.official); ``model_id`` is then a local checkpoint file or
    the default (the package downloads it).
    """

    name = "hps"
    higher_is_better = True
    scale = Scale(0.2, 0.4)

    def __init__(
        self,
        *,
        hps_version: str = "v2.1",
        model_id: str = DEFAULT_REPO,
        tokenizer_id: str = DEFAULT_TOKENIZER_ID,
        factory: Callable[[], tuple[Any, Any]] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        antialias: bool = True,
        precision: str = "auto",
        engine: str = "port",
        official_url: str | None = None,
    ) -> None:
        from flowopd.scorers import official

        official.check_engine(self.name, engine)
        if precision not in PRECISIONS:
            raise ValueError(f"HPSScorer: precision must be one of {PRECISIONS}, got {precision!r}")
        if hps_version not in HPS_FILES:
            raise ValueError(f"hps_version must be one of {sorted(HPS_FILES)}, got {hps_version!r}")
        if hps_version != "v2.1":
            warnings.warn(f"HPS {hps_version} selected; the Flow-OPD paper reports HPS v2.1", stacklevel=2)
        self._official = None
        if engine == "official":
            checkpoint = None if model_id == DEFAULT_REPO else model_id
            self._official = official.official_or_remote(
                self.name, official_url, lambda: official.HPSPackage(checkpoint, hps_version)
            )
            self.version = self._official.version
            return
        if factory is None:
            from transformers import CLIPTokenizer

            path = hub_file(model_id, HPS_FILES[hps_version], what=f"HPS {hps_version} checkpoint", param="model_id")
            model = load_hps_clip(path)
            tokenizer = from_pretrained(
                CLIPTokenizer.from_pretrained, tokenizer_id, what="CLIP tokenizer", param="tokenizer_id"
            )
        else:
            model, tokenizer = factory()
        self.device = resolve_device(device)
        self.dtype = dtype
        self.amp = precision == "amp" or (precision == "auto" and self.device.type == "cuda")
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=dtype)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.antialias = antialias
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        injected = ";injected" if factory is not None else ""
        checkpoint = "injected" if factory is not None else f"{model_id}:{HPS_FILES[hps_version]}"
        self.version = (
            f"code={CODE_VERSION};hps={hps_version};model={model_id}:{HPS_FILES[hps_version]};"
            f"tokenizer={tokenizer_id};ftfy={_has_ftfy()};antialias={antialias}{injected};"
            + engine_fields("flowopd-port", f"transformers-{package_version('transformers')}", checkpoint,
                            "amp-fp16" if self.amp else str(dtype).removeprefix("torch."), official=False)
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
        pixel_values = clip_pixel_values(images, self.image_size, resize="longest_pad", antialias=self.antialias)
        text = self.tokenizer(
            [open_clip_clean(p) for p in prompts], padding=True, truncation=True, max_length=self.context_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            image_embeds = image_embeddings(self.model, pixel_values.to(self.device, self.dtype))
            text_embeds = text_embeddings(self.model, text["input_ids"], text.get("attention_mask"))
        return paired_cosine(image_embeds, text_embeds).double().cpu().numpy()
