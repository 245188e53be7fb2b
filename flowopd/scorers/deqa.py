"""DeQA-Score-Mix3 (You et al., CVPR 2025): image quality 1-5 from an mPLUG-Owl2 (LLaMA-2 7B) fine-tuned for IQA.

Score (METHOD.md s.5, DeQA row): the model reads ``PROMPT`` with the image and the next-token logits of the five
level words are turned into an expected level,

    score = sum_k softmax(logits[excellent, good, fair, poor, bad])_k * (5, 4, 3, 2, 1)_k        in [1, 5].

Official code: zhiyuanyou/DeQA-Score ``src/evaluate/scorer.py`` (prompt, level tokens = the first token after BOS
of each word, ``expand2square`` padding with the image processor's mean colour, CLIP image processor at 448 px,
fp16) and the checkpoint's remote code (``model.score``), used by Flow-GRPO/Flow-OPD through yifan123/reward-server.
The remote code needs the old stack it was written for (DeQA-Score pins transformers==4.36.1, torch==2.0.1), so by
default this scorer runs in its own environment behind the scorer server; in-process use needs that environment
and ``trust_remote_code=True`` (never implied), or an injected ``factory``.

Native scale; the ``/5`` reward normalisation lives in the reward adapter. The Flow-OPD pipeline JPEG-encodes
images (PIL default quality 75) before sending them to the DeQA server (``deqa_score_remote`` in the release's
``flow_grpo/rewards.py``): ``jpeg_quality=75`` is the default for that reason; ``None`` sends the lossless image.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import Scale, ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.clip_common import batches, from_pretrained, resolve_device
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_MODEL_ID = "zhiyuanyou/DeQA-Score-Mix3"
DEFAULT_JPEG_QUALITY = 75  # the release's reward client: PIL's JPEG default quality
LEVELS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_INDEX = -200  # mPLUG-Owl2's placeholder id, replaced by visual tokens inside the model
# src/evaluate/scorer.py (the remote code's model.score builds the same string)
PROMPT = "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"


def deqa_score_from_logits(level_logits: torch.Tensor) -> torch.Tensor:
    """Expected level: ``softmax(level_logits) @ (5, 4, 3, 2, 1)``; ``level_logits`` is (N, 5) in ``LEVELS`` order."""
    if level_logits.ndim != 2 or level_logits.shape[-1] != len(LEVELS):
        raise ValueError(f"expected (N, {len(LEVELS)}) level logits, got {tuple(level_logits.shape)}")
    weights = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float32, device=level_logits.device)
    return torch.softmax(level_logits.float(), dim=-1) @ weights


def level_token_ids(tokenizer: Any, levels: Sequence[str] = LEVELS) -> list[int]:
    """Official rule: the first token after BOS of each level word (``tokenizer(levels)["input_ids"][i][1]``)."""
    ids = []
    for level in levels:
        tokens = tokenizer(level)["input_ids"]
        start = 1 if tokens and tokens[0] == getattr(tokenizer, "bos_token_id", None) else 0
        if len(tokens) <= start:
            raise ValueError(f"tokenizer produced no token for level word {level!r}")
        ids.append(int(tokens[start]))
    return ids


def tokenize_with_image(prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """mPLUG-Owl2's ``tokenizer_image_token``: tokenise the text around ``<|image|>`` separately, keep one BOS."""
    chunks = [tokenizer(chunk)["input_ids"] if chunk else [] for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == getattr(tokenizer, "bos_token_id", None) else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])
    return ids


def expand_to_square(image: Any, background: tuple[int, ...]) -> Any:
    """Official ``expand2square``: paste the PIL image centred on a square canvas of ``background`` colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return canvas


def jpeg_roundtrip(image: Any, quality: int) -> Any:
    """Encode and decode a PIL image as JPEG (what the Flow-GRPO/Flow-OPD DeQA client sends)."""
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _load_official(model_id: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor

    try:
        model = from_pretrained(
            AutoModelForCausalLM.from_pretrained, model_id, what="DeQA-Score model", param="model_id",
            trust_remote_code=True, torch_dtype=dtype, attn_implementation="eager",
        )
    except OSError:
        raise
    except Exception as e:  # the remote code targets transformers 4.36: name the likely cause
        raise RuntimeError(
            f"loading {model_id!r} with its remote code failed on transformers {transformers.__version__} ({e}). "
            f"DeQA-Score pins transformers==4.36.1; run it in its own environment behind the scorer server "
            f"(nox -s \"serve(scorer='deqa')\")"
        ) from e
    tokenizer = from_pretrained(
        AutoTokenizer.from_pretrained, model_id, what="DeQA-Score tokenizer", param="model_id", use_fast=False
    )
    image_processor = from_pretrained(
        CLIPImageProcessor.from_pretrained, model_id, what="DeQA-Score image processor", param="model_id"
    )
    return model, tokenizer, image_processor


class DeQAScorer:
    """DeQA-Score on (N, 3, H, W) float [0, 1] images; prompts are ignored.

    ``factory`` returns ``(model, tokenizer, image_processor)`` where ``model(input_ids=..., images=...)`` returns
    a mapping with ``"logits"`` (mPLUG-Owl2's interface, ``-200`` marking the image). Otherwise ``model_id`` (hub
    id or local directory) is loaded with its remote code, which requires ``trust_remote_code=True``.
    Details per image: the probabilities of the five levels (``p_excellent`` ... ``p_bad``).
    """

    name = "deqa"
    higher_is_better = True
    scale = Scale(1.0, 5.0)

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        trust_remote_code: bool = False,
        factory: Callable[[], tuple[Any, Any, Any]] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        jpeg_quality: int | None = DEFAULT_JPEG_QUALITY,
    ) -> None:
        if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int)
                                         or not 1 <= jpeg_quality <= 100):
            raise ValueError(f"DeQAScorer: jpeg_quality must be an integer in 1..100 or None, got {jpeg_quality!r}")
        self.device = resolve_device(device)
        # official: fp16 (on CUDA); CPU half matmuls are slow or missing, so fp32 there
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if factory is None:
            if not trust_remote_code:
                raise ValueError(
                    f"{model_id!r} runs its own model code (mPLUG-Owl2, trust_remote_code). Pass "
                    f"trust_remote_code=True to run it in this process (it needs transformers==4.36.1), or use the "
                    f"scorer server, which runs it in its own environment: nox -s \"serve(scorer='deqa')\""
                )
            model, tokenizer, image_processor = _load_official(model_id, self.dtype)
        else:
            model, tokenizer, image_processor = factory()
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality
        self.level_ids = level_token_ids(tokenizer)
        self.input_ids = torch.tensor(tokenize_with_image(PROMPT, tokenizer), dtype=torch.long)
        self.background = tuple(int(x * 255) for x in image_processor.image_mean)
        injected = ";injected" if factory is not None else ""
        # our wrapper around the checkpoint's network (the official scorer.py is not run): a port
        self.version = f"code={CODE_VERSION};model={model_id};jpeg={jpeg_quality}{injected};" + engine_fields(
            "flowopd-port", f"transformers-{package_version('transformers')}",
            "injected" if factory is not None else model_id, str(self.dtype).removeprefix("torch."), official=False,
        )

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> ScoreBatch:
        check_images(images)
        scores, probs = [], []
        for sl in batches(len(images), self.batch_size):
            s, p = self._score_batch(images[sl])
            scores.append(s)
            probs.append(p)
        if not scores:
            return ScoreBatch(np.zeros(0), {f"p_{level}": [] for level in LEVELS})
        p = np.concatenate(probs)
        return ScoreBatch(np.concatenate(scores), {f"p_{lv}": p[:, k].tolist() for k, lv in enumerate(LEVELS)})

    @torch.inference_mode()
    def _score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        pils = [Image.fromarray(arr) for arr in to_uint8_hwc(images)]
        if self.jpeg_quality is not None:
            pils = [jpeg_roundtrip(p, self.jpeg_quality) for p in pils]
        pils = [expand_to_square(p, self.background) for p in pils]
        pixel_values = self.image_processor(images=pils, return_tensors="pt")["pixel_values"]
        input_ids = self.input_ids.to(self.device).repeat(len(pils), 1)
        out = self.model(input_ids=input_ids, images=pixel_values.to(self.device, self.dtype))
        level_logits = out["logits"][:, -1, self.level_ids]
        scores = deqa_score_from_logits(level_logits)
        probs = torch.softmax(level_logits.float(), dim=-1)
        return scores.double().cpu().numpy(), probs.double().cpu().numpy()
