"""The T2I-CompBench scorer: one class, one method per category (METHOD.md section 5).

Official pipeline: Karine-Huang/T2I-CompBench at commit 1b70949, run on the saved PNGs; the rules are restated
in ``flowopd.scorers.compbench_rules`` and this module turns images into their inputs:

- color / shape / texture: BLIP-VQA (``Salesforce/blip-vqa-base``, the official
  ``model_base_vqa_capfilt_large`` weights converted by transformers) at the official 480 px, question token 0
  set to ``[ENC]`` and the answer decoder started from ``[DEC]`` as ``BLIP_vqa.py`` does; the score of a
  question is P(yes) / (P(yes) + P(no)) of the first answer token;
- spatial / numeracy: UniDet is not packaged, so an open-vocabulary detector (OWLv2,
  ``google/owlv2-base-patch16-ensemble``) is queried with the UniDet label names the rules could match, so
  that the official label-matching quirks survive; boxes live in the 479 px frame the official rules use;
- 3d_spatial: the same detector + DPT-Hybrid MiDaS depth (``Intel/dpt-hybrid-midas``, the official
  ``dpt_hybrid-midas-501f0c75.pt``), min-max normalised, quantised to 8 bits and resized as the official
  script's depth PNGs are;
- non_spatial: CLIP ViT-B/32 cosine similarity (no scaling, no clipping);
- complex: 3-in-1 of the attribute, spatial and CLIP scores by the prompt's kind (complex_val_spatial.txt,
  complex_val_action.txt).

docs/scorers/compbench.md lists every difference from the official pipeline and its expected effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowopd.scorers import compbench_rules as rules
from flowopd.scorers.base import Scale, ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.clip_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
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
from flowopd.specs import PromptSetSpec

CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")
OFFICIAL_COMMIT = "1b7094991a57f3c22abdd4f6e8ba6c1a15517073"

DEFAULT_BLIP_ID = "Salesforce/blip-vqa-base"
DEFAULT_DETECTOR_ID = "google/owlv2-base-patch16-ensemble"
DEFAULT_DEPTH_ID = "Intel/dpt-hybrid-midas"
DEFAULT_CLIP_ID = "openai/clip-vit-base-patch32"

BLIP_IMAGE_SIZE = 480  # configs/vqa.yaml image_size (the HF port was converted at 384)
BLIP_MAX_QUESTION_TOKENS = 35  # blip_vqa.py: tokenizer(..., truncation=True, max_length=35)
DEPTH_INPUT_SIZE = 480  # model_bank_3d.py: transforms.Resize([480, 480]), Normalize(0.5, 0.5)
DETECTOR_QUERY_TEMPLATE = "a photo of a {}"
DEFAULT_DETECTION_THRESHOLD = 0.3  # UniDet used 0.5 on its own (differently calibrated) scores

# The 3-in-1 kind of each complex prompt comes from these two official files (pinned like the prompt files).
_COMPLEX_LIST_URL = (
    f"https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/{OFFICIAL_COMMIT}/examples/dataset/"
)
COMPLEX_KIND_FILES = {
    "spatial": PromptSetSpec(
        format="lines",
        path="t2i_compbench/complex_val_spatial.txt",
        url=_COMPLEX_LIST_URL + "complex_val_spatial.txt",
        sha256="6c7ac0ab75c7c9080cfc7b421fb059b9b0febb98471707aeedf58771088abc02",
    ),
    "action": PromptSetSpec(
        format="lines",
        path="t2i_compbench/complex_val_action.txt",
        url=_COMPLEX_LIST_URL + "complex_val_action.txt",
        sha256="d49ee4c7f99e3f3379fb8704a54ff5288b83bb412971edf616a4721c2473308e",
    ),
}

Queries = Sequence[tuple[str, str]]  # (label the rules see, query word for the detector)


class Detector(Protocol):
    """Anything that finds labelled boxes: OWLv2 here, a UniDet client elsewhere.

    ``detect(images, queries)`` gets rule-frame images and, per image, (label, word) pairs; it returns, per
    image, Detections whose ``label`` is one of the given labels and whose boxes are in that image's pixels,
    sorted by decreasing score.
    """

    def detect(
        self, images: Sequence[Image.Image], queries: Sequence[Queries]
    ) -> list[list[rules.Detection]]: ...


# ----------------------------------------------------------------------------------------------- models


class BlipVQA:
    """``BLIP_VQA.vqa_prob`` on a transformers ``BlipForQuestionAnswering``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        image_size: int = BLIP_IMAGE_SIZE,
        batch_size: int = 16,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.image_size = image_size
        self.batch_size = batch_size
        text_config = model.config.text_config
        self.bos_id = text_config.bos_token_id  # [DEC] = 30522
        enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
        # BLIP's init_tokenizer adds [DEC] then [ENC] after BERT's 30522 tokens
        self.enc_id = enc_id if enc_id is not None and enc_id != tokenizer.unk_token_id else self.bos_id + 1
        self.yes_id = tokenizer.convert_tokens_to_ids("yes")  # 2748 in bert-base-uncased
        self.no_id = tokenizer.convert_tokens_to_ids("no")  # 2053

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize((480, 480), BICUBIC) on the PIL image, ToTensor, CLIP mean / std (BLIP's test transform)."""
        size = (self.image_size, self.image_size)
        arr = np.stack([np.asarray(im.resize(size, Image.Resampling.BICUBIC)) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def yes_probabilities(
        self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """P(yes) / (P(yes) + P(no)) of the answer's first token, for every question of every image."""
        out: list[list[float]] = [[] for _ in images]
        for chunk in batches(len(images), self.batch_size):
            idx = [i for i in range(chunk.start, chunk.stop) if questions[i]]
            if not idx:
                continue
            pixels = self.pixel_values([images[i] for i in idx])
            # interpolate_pos_encoding: the official model runs at 480 px, the HF port's grid is 384 px
            image_embeds = self.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)[0]
            rows = [(k, q) for k, i in enumerate(idx) for q in questions[i]]
            tok = self.tokenizer(
                [q for _, q in rows],
                padding="longest",
                truncation=True,
                max_length=BLIP_MAX_QUESTION_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            input_ids = tok.input_ids.clone()
            input_ids[:, 0] = self.enc_id  # blip_vqa.py: question.input_ids[:, 0] = enc_token_id
            embeds = image_embeds[torch.tensor([k for k, _ in rows], device=self.device)]
            question_states = self.model.text_encoder(
                input_ids=input_ids,
                attention_mask=tok.attention_mask,
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device),
            )[0]
            start = torch.full((len(rows), 1), self.bos_id, dtype=torch.long, device=self.device)
            logits = self.model.text_decoder(
                input_ids=start,
                encoder_hidden_states=question_states,
                encoder_attention_mask=tok.attention_mask,
            ).logits[:, 0, :]
            prob = torch.softmax(logits.float(), dim=-1)
            p_yes = (prob[:, self.yes_id] / (prob[:, self.yes_id] + prob[:, self.no_id])).tolist()
            for (k, _), p in zip(rows, p_yes):
                out[idx[k]].append(float(p))
        return out


class OwlDetector:
    """OWLv2 as a closed-vocabulary detector: per box the best query, sigmoid score, per-label NMS."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device,
        threshold: float = DEFAULT_DETECTION_THRESHOLD,
        batch_size: int = 8,
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_text_length = model.config.text_config.max_position_embeddings  # 16 for OWLv2

    @torch.no_grad()
    def detect(
        self, images: Sequence[Image.Image], queries: Sequence[Queries]
    ) -> list[list[rules.Detection]]:
        results: list[list[rules.Detection]] = [[] for _ in images]
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for i, q in enumerate(queries):
            if q:  # a prompt whose objects have no label cannot match anything: nothing to detect
                groups.setdefault(tuple(q), []).append(i)
        for group, members in groups.items():
            texts = [DETECTOR_QUERY_TEMPLATE.format(word) for _, word in group]
            for chunk in batches(len(members), self.batch_size):
                ids = members[chunk]
                inputs = self.processor(
                    text=[texts] * len(ids),
                    images=[images[i] for i in ids],
                    padding="max_length",
                    truncation=True,
                    max_length=self.max_text_length,
                    return_tensors="pt",
                ).to(self.device)
                out = self.model(**inputs)
                scores, best = out.logits.float().sigmoid().max(dim=-1)  # (B, boxes)
                for b, i in enumerate(ids):
                    results[i] = self._boxes(images[i], group, scores[b], best[b], out.pred_boxes[b].float())
        return results

    def _boxes(
        self,
        image: Image.Image,
        group: Queries,
        scores: torch.Tensor,
        best: torch.Tensor,
        boxes: torch.Tensor,
    ) -> list[rules.Detection]:
        width, height = image.size
        side = max(width, height)  # OWLv2 pads to a square at the bottom / right: boxes are relative to it
        keep = (scores > self.threshold).nonzero().flatten().tolist()
        dets = []
        for j in keep:
            cx, cy, w, h = (boxes[j] * side).tolist()
            box = (
                min(max(cx - w / 2, 0.0), width),
                min(max(cy - h / 2, 0.0), height),
                min(max(cx + w / 2, 0.0), width),
                min(max(cy + h / 2, 0.0), height),
            )
            dets.append(rules.Detection(group[int(best[j])][0], float(scores[j]), box))
        return rules.nms_per_label(dets)


class DepthEstimator:
    """The official depth PNG, recomputed: DPT inverse depth at 480 x 480, min-max, 8 bits, rule frame."""

    def __init__(
        self, model: Any, device: torch.device, input_size: int = DEPTH_INPUT_SIZE, batch_size: int = 8
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.input_size = input_size
        self.batch_size = batch_size
        embeddings = getattr(getattr(model, "dpt", None), "embeddings", None)
        if hasattr(embeddings, "image_size"):
            # DPT-Hybrid (converted at 384 px) refuses other sizes although it resizes its position embeddings
            # bilinearly, as MiDaS does for the official 480 px input: declare the size we feed it
            embeddings.image_size = (input_size, input_size)

    @torch.no_grad()
    def depth_maps(
        self, images: Sequence[Image.Image], frames: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Per image a float (h, w) map in [0, 1] on the rule frame (``frames``: (h, w)); larger = nearer."""
        out: list[np.ndarray] = []
        size = (self.input_size, self.input_size)
        for chunk in batches(len(images), self.batch_size):
            arr = np.stack([np.asarray(im.resize(size, Image.Resampling.BILINEAR)) for im in images[chunk]])
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5).to(self.device)
            predicted = self.model(pixel_values=x).predicted_depth.float()
            for k, i in enumerate(range(chunk.start, chunk.stop)):
                out.append(self._official_png(predicted[k], images[i].size, frames[i]))
        return out

    @staticmethod
    def _official_png(depth: torch.Tensor, image_size: tuple[int, int], frame: tuple[int, int]) -> np.ndarray:
        lo, hi = depth.min(), depth.max()
        depth = (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)
        width, height = image_size
        depth = F.interpolate(depth[None, None], size=(height, width), mode="bilinear", align_corners=True)
        depth = depth[0, 0]
        # Image.fromarray(255 * depth).convert('L') truncates to uint8; the 3-D dataset then applies the
        # detection transform (Resize(479, max_size=480), bilinear) and divides by 255
        u8 = np.clip(255.0 * depth.cpu().numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(u8).resize((frame[1], frame[0]), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32) / 255.0


class ClipSimilarity:
    """``CLIP_similarity.py``: cosine of the L2-normalised CLIP image and text embeddings."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.image_size = model.config.vision_config.image_size

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for chunk in batches(len(texts), self.batch_size):
            pixels = clip_pixel_values(images[chunk], self.image_size).to(self.device)
            tok = self.tokenizer(
                list(texts[chunk]), padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(self.device)
            img = image_embeddings(self.model, pixels)
            txt = text_embeddings(self.model, tok.input_ids, tok.attention_mask)
            out.extend(float(v) for v in paired_cosine(img, txt).cpu())
        return out


# ----------------------------------------------------------------------------------------------- scorer


@dataclass
class _Objects:
    """What a spatial-type rule needs for one image."""

    obj1: str | None
    obj2: str | None
    locality: str | None


class CompBenchScorer:
    """T2I-CompBench, one category per instance (``category`` is the benchmark spec's scorer option).

    Learned models load lazily by hub id or local path (``blip_model``, ``detector_model``, ``depth_model``,
    ``clip_model``); tests inject tiny ones through the factories, which return ``(model, tokenizer)`` for
    BLIP and CLIP, ``(model, processor)`` for OWLv2 and the model for DPT. ``detector`` replaces OWLv2 by any
    :class:`Detector` (e.g. a client of a real UniDet). ``label_space="unidet"`` queries the UniDet label
    names that the official string matching could accept, ``"prompt"`` the prompt's words themselves.
    ``nlp`` chooses the prompt parser (see :class:`~flowopd.scorers.compbench_rules.PromptParser`).
    For complex prompts the 3-in-1 kind is ``metadata["complex_kind"]`` when given, else looked up in the
    official lists (read through ``flowopd.data``, so ``FLOWOPD_DATA_DIR`` applies).
    """

    name = "compbench"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(
        self,
        category: str,
        *,
        blip_model: str = DEFAULT_BLIP_ID,
        detector_model: str = DEFAULT_DETECTOR_ID,
        depth_model: str = DEFAULT_DEPTH_ID,
        clip_model: str = DEFAULT_CLIP_ID,
        blip_factory: Callable[[], tuple[Any, Any]] | None = None,
        detector_factory: Callable[[], tuple[Any, Any]] | None = None,
        depth_factory: Callable[[], Any] | None = None,
        clip_factory: Callable[[], tuple[Any, Any]] | None = None,
        detector: Detector | None = None,
        label_space: str = "unidet",
        detection_threshold: float = DEFAULT_DETECTION_THRESHOLD,
        blip_image_size: int = BLIP_IMAGE_SIZE,
        depth_input_size: int = DEPTH_INPUT_SIZE,
        nlp: Any = "auto",
        spacy_model: str = "en_core_web_sm",
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"T2I-CompBench category must be one of {CATEGORIES}, got {category!r}")
        if label_space not in ("unidet", "prompt"):
            raise ValueError(f"label_space must be 'unidet' or 'prompt', got {label_space!r}")
        self.category = category
        self.label_space = label_space
        self.detection_threshold = detection_threshold
        self.blip_image_size = blip_image_size
        self.depth_input_size = depth_input_size
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.parser = rules.PromptParser(nlp, spacy_model)
        self._ids = {"blip": blip_model, "detector": detector_model, "depth": depth_model, "clip": clip_model}
        self._factories = {
            "blip": blip_factory,
            "detector": detector_factory,
            "depth": depth_factory,
            "clip": clip_factory,
        }
        self._detector = detector
        self._blip: BlipVQA | None = None
        self._depth: DepthEstimator | None = None
        self._clip: ClipSimilarity | None = None
        self._complex_lists: dict[str, list[str]] | None = None
        detector_name = type(detector).__name__ if detector is not None else f"owlv2>{detection_threshold:g}"
        parts = {
            "color": "blip",
            "shape": "blip",
            "texture": "blip",
            "non_spatial": "clip",
            "spatial": detector_name,
            "numeracy": detector_name,
            "3d_spatial": f"{detector_name}+dpt",
            "complex": f"blip+{detector_name}+clip",
        }
        # a port with substitutes (OWLv2 for UniDet, interpolated BLIP positions): never the official engine
        self.version = (
            f"t2i-compbench@{OFFICIAL_COMMIT[:7]}/{category}/{parts[category]}"
            f"/labels={label_space}/nlp={self.parser.name};"
            + engine_fields("flowopd-port", f"transformers-{package_version('transformers')}", parts[category],
                            "fp32", official=False)
        )

    # ------------------------------------------------------------------------------------------- components

    def _load(self, key: str, loader: Callable[[str], Any]) -> Any:
        factory = self._factories[key]
        return factory() if factory is not None else loader(self._ids[key])

    def blip(self) -> BlipVQA:
        if self._blip is None:

            def load(model_id: str) -> tuple[Any, Any]:
                from transformers import AutoTokenizer, BlipForQuestionAnswering

                what, param = "T2I-CompBench BLIP-VQA model", "blip_model"
                return (
                    from_pretrained(
                        BlipForQuestionAnswering.from_pretrained, model_id, what=what, param=param
                    ),
                    from_pretrained(
                        AutoTokenizer.from_pretrained, model_id, what=what + " tokenizer", param=param
                    ),
                )

            model, tokenizer = self._load("blip", load)
            self._blip = BlipVQA(model, tokenizer, self.device, self.blip_image_size, self.batch_size)
        return self._blip

    def detector(self) -> Detector:
        if self._detector is None:

            def load(model_id: str) -> tuple[Any, Any]:
                from transformers import Owlv2ForObjectDetection, Owlv2Processor

                what, param = "T2I-CompBench detector (UniDet substitute)", "detector_model"
                return (
                    from_pretrained(
                        Owlv2ForObjectDetection.from_pretrained, model_id, what=what, param=param
                    ),
                    from_pretrained(
                        Owlv2Processor.from_pretrained, model_id, what=what + " processor", param=param
                    ),
                )

            model, processor = self._load("detector", load)
            self._detector = OwlDetector(
                model, processor, self.device, self.detection_threshold, self.batch_size
            )
        return self._detector

    def depth(self) -> DepthEstimator:
        if self._depth is None:

            def load(model_id: str) -> Any:
                from transformers import DPTForDepthEstimation

                return from_pretrained(
                    DPTForDepthEstimation.from_pretrained,
                    model_id,
                    what="T2I-CompBench depth model",
                    param="depth_model",
                )

            self._depth = DepthEstimator(
                self._load("depth", load), self.device, self.depth_input_size, self.batch_size
            )
        return self._depth

    def clip(self) -> ClipSimilarity:
        if self._clip is None:

            def load(model_id: str) -> tuple[Any, Any]:
                from transformers import AutoTokenizer, CLIPModel

                what, param = "T2I-CompBench CLIP model", "clip_model"
                return (
                    from_pretrained(CLIPModel.from_pretrained, model_id, what=what, param=param),
                    from_pretrained(
                        AutoTokenizer.from_pretrained, model_id, what=what + " tokenizer", param=param
                    ),
                )

            model, tokenizer = self._load("clip", load)
            self._clip = ClipSimilarity(model, tokenizer, self.device, self.batch_size)
        return self._clip

    # ------------------------------------------------------------------------------------------- scoring

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        """Per-image scores on the category's native 0-1 scale, a ``category`` detail and the evidence."""
        check_images(images)
        prompts = check_prompts(images, prompts)
        metadata = list(metadata) if metadata is not None else [{}] * len(prompts)
        if len(metadata) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(metadata)} metadata rows; pass one per image"
            )
        if len(prompts) == 0:
            return ScoreBatch(np.zeros(0), {"category": []})
        # uint8 RGB PIL images: what the official scripts read from the saved PNGs
        pil = [Image.fromarray(a) for a in to_uint8_hwc(images)]
        if self.category in ATTRIBUTE_CATEGORIES:
            scores, details = self._attribute(pil, prompts)
        elif self.category == "spatial":
            scores, details = self._spatial(
                pil, [self._simple_objects(p, rules.SPATIAL_2D_WORDS) for p in prompts]
            )
        elif self.category == "3d_spatial":
            scores, details = self._spatial(
                pil, [self._simple_objects(p, rules.SPATIAL_3D_WORDS) for p in prompts], three_d=True
            )
        elif self.category == "numeracy":
            scores, details = self._numeracy(pil, prompts)
        elif self.category == "non_spatial":
            scores, details = self.clip().cosine(images, prompts), {}
        else:
            scores, details = self._complex(images, pil, prompts, metadata)
        return ScoreBatch(
            np.asarray(scores, dtype=np.float64), {"category": [self.category] * len(prompts), **details}
        )

    def _attribute(
        self, pil: list[Image.Image], prompts: Sequence[str]
    ) -> tuple[list[float], dict[str, list]]:
        questions = [rules.blip_questions(self.parser.noun_phrases(p)) for p in prompts]
        probabilities = self.blip().yes_probabilities(pil, questions)
        return [rules.blip_score(p) for p in probabilities], {"questions": [" | ".join(q) for q in questions]}

    def _simple_objects(self, prompt: str, vocabulary: Sequence[str]) -> _Objects:
        obj1, obj2 = self.parser.spatial_objects(prompt, vocabulary)
        return _Objects(obj1, obj2, rules.first_locality(prompt, vocabulary))

    def _queries(self, words: Sequence[str | None]) -> list[tuple[str, str]]:
        """(label, query word) pairs for the detector: UniDet labels containing each word, or the words."""
        pairs: list[tuple[str, str]] = []
        for word in dict.fromkeys(w for w in words if w):
            if self.label_space == "prompt":
                pairs.append((word, word))
                continue
            for label in rules.unidet_labels_for(word):
                pairs.extend((label, name) for name in rules.label_query_texts(label))
        return list(dict.fromkeys(pairs))

    def _frames(self, pil: list[Image.Image]) -> list[Image.Image]:
        """Images resized as the official detection transform does (Resize(479, max_size=480), bilinear)."""
        out = []
        for im in pil:
            h, w = rules.rule_frame_size(im.height, im.width)
            out.append(
                im if (h, w) == (im.height, im.width) else im.resize((w, h), Image.Resampling.BILINEAR)
            )
        return out

    def _spatial(
        self, pil: list[Image.Image], objects: Sequence[_Objects], three_d: bool = False
    ) -> tuple[list[float], dict[str, list]]:
        frames = self._frames(pil)
        named = [(rules.to_detector_name(o.obj1), rules.to_detector_name(o.obj2)) for o in objects]
        detections = self.detector().detect(frames, [self._queries(n) for n in named])
        if three_d:
            depths = self.depth().depth_maps(pil, [(f.height, f.width) for f in frames])
            scores = [
                rules.spatial_score_3d(o.obj1, o.obj2, o.locality, d, depth)
                for o, d, depth in zip(objects, detections, depths)
            ]
        else:
            scores = [
                rules.spatial_score_2d(o.obj1, o.obj2, o.locality, d) for o, d in zip(objects, detections)
            ]
        details = {
            "objects": [f"{o.obj1}|{o.obj2}" for o in objects],
            "locality": [o.locality for o in objects],
            "detections": [len(d) for d in detections],
        }
        return scores, details

    def _numeracy(
        self, pil: list[Image.Image], prompts: Sequence[str]
    ) -> tuple[list[float], dict[str, list]]:
        targets = [rules.numeracy_targets(self.parser.tokens(p)) for p in prompts]
        words = [[rules.numeracy_detector_name(o) for o in objs] for objs, _ in targets]
        detections = self.detector().detect(self._frames(pil), [self._queries(w) for w in words])
        scores = [rules.numeracy_score(objs, counts, d) for (objs, counts), d in zip(targets, detections)]
        targets_detail = [
            "|".join(f"{o}:{counts[i] if i < len(counts) else '?'}" for i, o in enumerate(objs))
            for objs, counts in targets
        ]
        return scores, {"targets": targets_detail, "detections": [len(d) for d in detections]}

    def _complex_kind(self, prompt: str, meta: Mapping[str, Any]) -> str:
        if meta.get("complex_kind"):
            return str(meta["complex_kind"])
        if self._complex_lists is None:
            from flowopd.data import fetch_prompt_file

            self._complex_lists = {
                kind: fetch_prompt_file(spec).read_text(encoding="utf-8").splitlines()
                for kind, spec in COMPLEX_KIND_FILES.items()
            }
        return rules.complex_kind(prompt, self._complex_lists["spatial"], self._complex_lists["action"])

    def _complex(
        self,
        images: torch.Tensor,
        pil: list[Image.Image],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> tuple[list[float], dict[str, list]]:
        kinds = [self._complex_kind(p, m) for p, m in zip(prompts, metadata)]
        attribute, _ = self._attribute(pil, prompts)
        spatial: list[float | None] = [None] * len(prompts)
        action: list[float | None] = [None] * len(prompts)
        need_spatial = [i for i, k in enumerate(kinds) if k in ("spatial", "spatial_action")]
        need_action = [i for i, k in enumerate(kinds) if k in ("action", "spatial_action")]
        if need_spatial:
            objects = []
            for i in need_spatial:
                obj1, obj2 = rules.complex_spatial_objects(self.parser.tokens(prompts[i]))
                objects.append(_Objects(obj1, obj2, rules.first_locality(prompts[i], rules.SPATIAL_2D_WORDS)))
            values, _ = self._spatial([pil[i] for i in need_spatial], objects)
            for i, v in zip(need_spatial, values):
                spatial[i] = v
        if need_action:
            # CLIP_similarity.py --complex: the prompt without its adjectives
            texts = [rules.without_adjectives(self.parser.tokens(prompts[i])) for i in need_action]
            values = self.clip().cosine(images[need_action], texts)
            for i, v in zip(need_action, values):
                action[i] = v
        scores = [rules.three_in_one(k, a, s, c) for k, a, s, c in zip(kinds, attribute, spatial, action)]
        details = {"complex_kind": kinds, "attribute": attribute, "spatial": spatial, "action": action}
        return scores, details
