"""The GenEval scorer: Mask2Former detections + CLIP colour, judged by GenEval's rules (METHOD.md section 5).

Official pipeline (djghosh13/geneval ``evaluation/evaluate_images.py``): mmdet 2.x Mask2Former Swin-S COCO
instance segmentation on the saved PNG, per-class filtering (score > 0.3, 0.9 for counting, at most 16),
the include / exclude clauses, and colour by zero-shot CLIP ViT-L/14 (openai weights) on the object
composited over grey #999 and cropped to its box. The rules live in ``flowopd.scorers.geneval_rules``;
this module turns images into the rules' inputs.

Detector backends:
- ``"hf"`` (default): transformers' Mask2FormerForUniversalSegmentation (``facebook/mask2former-swin-small-
  coco-instance``, converted from the Detectron2 release) with mmdet's test-time pre- and post-processing
  re-implemented here (resize to fit 1333x800, normalise, pad to 32; bilinear mask upsampling; score =
  class probability x mean mask probability; boxes from masks);
- ``"mmdet"``: the official mmdet checkpoint, run in its own environment (mmdet 2.x); ``detections_from_mmdet``
  turns mmdet's ``(bbox_results, segm_results)`` into Detections.
docs/scorers/geneval_ocr.md lists every difference from the official pipeline and its expected effect.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowopd.scorers.base import Scale, ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.clip_common import (
    clip_pixel_values,
    from_pretrained,
    image_embeddings,
    load_weights_file,
    resolve_device,
    text_embeddings,
)
from flowopd.scorers.engine import engine_fields, package_version
from flowopd.scorers.geneval_rules import COLORS, COUNTING_THRESHOLD, THRESHOLD, Detection, score_geneval

DEFAULT_DETECTOR_ID = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_MMDET_CHECKPOINT = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
DEFAULT_MMDET_CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
DEFAULT_COLOR_ID = "openai/clip-vit-large-patch14"

# GenEval's evaluation/object_names.txt: the 80 COCO thing classes in the detector's class-index order.
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Other spellings of the same 80 classes -> GenEval's. mmdet / Detectron2 / the HF checkpoints'
# id2label ("coco-detection-mmdet-id2label.json") differ from GenEval in three names; Darknet/VOC-style
# lists (coco.names) in seven more.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "hair dryer": "hair drier",
    "doughnut": "donut",
}

# mmdet 2.x Mask2Former test pipeline (configs/mask2former/*_lsj_8x2_50e_coco.py): Resize keep_ratio to fit
# img_scale, Normalize(to_rgb=True), Pad(size_divisor=32, value 0 after normalisation).
MMDET_IMG_SCALE = (1333, 800)
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
MMDET_MAX_PER_IMAGE = 100

# The three templates of evaluate_images.py's color_classification, formatted with the GenEval class name.
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
GREY_BACKGROUND = "#999"

RawDetections = Mapping[str, Sequence[Detection]]
DetectFn = Callable[[np.ndarray], RawDetections]
ColorFn = Callable[[Image.Image, str, Sequence[Detection]], list[str]]


def _normalise_label(label: str) -> str:
    return " ".join(str(label).lower().replace("_", " ").replace("-", " ").split())


def label_map(id2label: Mapping[Any, str]) -> dict[int, str]:
    """Map a detector's class ids to GenEval class names (exact, alias, or generic ``LABEL_i`` by index).

    Raises ValueError naming the first label that is not a COCO class, or the GenEval names left uncovered.
    """
    ids = sorted(int(k) for k in id2label)
    labels = {int(k): str(v) for k, v in id2label.items()}
    if ids != list(range(len(OBJECT_NAMES))):
        raise ValueError(
            f"detector id2label has ids {ids[:3]}...{ids[-3:]} ({len(ids)} labels); GenEval needs the 80 COCO "
            "thing classes with ids 0..79 (an instance-segmentation checkpoint, not panoptic)"
        )
    if all(labels[i] == f"LABEL_{i}" for i in ids):  # untitled config (e.g. a test model): index order
        return dict(enumerate(OBJECT_NAMES))
    mapping: dict[int, str] = {}
    for i in ids:
        name = _normalise_label(labels[i])
        name = LABEL_ALIASES.get(name, name)
        if name not in OBJECT_NAMES:
            raise ValueError(
                f"detector id2label[{i}] = {labels[i]!r} is not a GenEval class; add its spelling to "
                "flowopd.scorers.geneval.LABEL_ALIASES"
            )
        mapping[i] = name
    missing = sorted(set(OBJECT_NAMES) - set(mapping.values()))
    if missing:
        raise ValueError(f"detector id2label does not cover the GenEval classes {missing}")
    return mapping


def detections_from_mmdet(
    result: Any, names: Sequence[str] = OBJECT_NAMES
) -> dict[str, list[Detection]]:
    """mmdet 2.x ``inference_detector`` output -> raw Detections per GenEval class name (unfiltered).

    ``result`` is ``(bbox_results, segm_results)`` (or ``bbox_results`` alone): per class index an array
    (k, 5) of x1, y1, x2, y2, score and a list of k (H, W) bool masks; class index i is ``names[i]``,
    as the official zips it with object_names.txt. Classes without detections are left out.
    """
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    if len(bbox) != len(names):
        raise ValueError(f"mmdet result has {len(bbox)} classes, expected {len(names)} (GenEval's COCO classes)")
    if segm is not None and len(segm) != len(names):
        raise ValueError(f"mmdet segm results have {len(segm)} classes, expected {len(names)}")
    out: dict[str, list[Detection]] = {}
    for index, classname in enumerate(names):
        rows = np.asarray(bbox[index], dtype=np.float32).reshape(-1, 5)
        masks = None if segm is None else segm[index]
        if masks is not None and len(masks) != len(rows):
            raise ValueError(f"mmdet result for {classname!r}: {len(rows)} boxes but {len(masks)} masks")
        dets = []
        for j, row in enumerate(rows):
            mask = None
            if masks is not None:
                if isinstance(masks[j], Mapping):
                    raise TypeError(
                        f"mmdet mask {j} of {classname!r} is RLE-encoded; decode it (pycocotools.mask.decode) first"
                    )
                mask = np.asarray(masks[j], dtype=bool)
            dets.append(Detection(box=tuple(float(v) for v in row[:4]), score=float(row[4]), mask=mask))
        if dets:
            out[classname] = dets
    return out


def mmdet_rescale_shape(height: int, width: int, scale: tuple[int, int] = MMDET_IMG_SCALE) -> tuple[int, int]:
    """mmcv.imrescale's output (height, width): the largest keep-ratio size within (long, short) = scale."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_backend() -> str:
    """``"cv2"`` when OpenCV is importable (mmcv's own resize), else ``"torch"``."""
    import importlib.util

    return "cv2" if importlib.util.find_spec("cv2") is not None else "torch"


def mmdet_preprocess(
    rgb: np.ndarray, scale: tuple[int, int] = MMDET_IMG_SCALE, size_divisor: int = 32
) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 RGB (H, W, 3) -> ((1, 3, Hp, Wp) normalised and zero-padded pixels, resized (h, w)).

    As mmdet's test pipeline: bilinear keep-ratio resize of the uint8 image, RGB normalisation with ImageNet
    mean/std, then zero padding (after normalisation) to a multiple of 32. The resize is ``cv2.resize`` (what
    ``mmcv.imresize`` calls, bit-exact) when OpenCV is installed; otherwise torch's float bilinear re-rounded to
    uint8, which differs from cv2's fixed-point arithmetic by one grey level on about a tenth of the values
    (``nox -s parity``; docs/scorers/parity.md).
    """
    h, w = rgb.shape[:2]
    nh, nw = mmdet_rescale_shape(h, w, scale)
    if (nh, nw) != (h, w) and resize_backend() == "cv2":
        import cv2

        rgb = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (nh, nw):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).round().clamp(0, 255)
    x = (x - torch.tensor(MMDET_MEAN).view(1, 3, 1, 1)) / torch.tensor(MMDET_STD).view(1, 3, 1, 1)
    ph, pw = math.ceil(nh / size_divisor) * size_divisor, math.ceil(nw / size_divisor) * size_divisor
    return F.pad(x, (0, pw - nw, 0, ph - nh)), (nh, nw)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's mask2bbox: (K, H, W) bool -> (K, 4) float x1, y1, x2 + 1, y2 + 1; all zeros for an empty mask."""
    k, h, w = masks.shape
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    cols = torch.arange(w, device=masks.device).expand(k, w)
    rows = torch.arange(h, device=masks.device).expand(k, h)
    x1 = torch.where(x_any, cols, w).min(dim=1).values
    x2 = torch.where(x_any, cols, -1).max(dim=1).values + 1
    y1 = torch.where(y_any, rows, h).min(dim=1).values
    y2 = torch.where(y_any, rows, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(x_any.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def mask2former_instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_shape: tuple[int, int],
    resized_shape: tuple[int, int],
    original_shape: tuple[int, int],
    *,
    max_per_image: int = MMDET_MAX_PER_IMAGE,
    min_class_score: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet 2.x Mask2Former instance post-processing for one image -> (labels, boxes, scores, masks).

    ``class_logits`` (Q, C + 1) with the no-object class last, ``mask_logits`` (Q, h, w) for the padded input.
    Top ``max_per_image`` (query, class) pairs by softmax probability; masks upsampled bilinearly to the
    padded input, cropped to the resized image, upsampled to the original size, thresholded at logit 0;
    score = class probability x mean sigmoid over the mask; boxes from masks. Pairs with class probability
    <= ``min_class_score`` are dropped before upsampling: their score cannot exceed it (mean sigmoid <= 1).
    """
    scores = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    num_queries, num_classes = scores.shape
    top_scores, top_index = scores.flatten().topk(min(max_per_image, scores.numel()), sorted=False)
    keep = top_scores > min_class_score
    top_scores, top_index = top_scores[keep], top_index[keep]
    labels = top_index % num_classes
    queries = top_index // num_classes
    masks = mask_logits[queries].float()
    if masks.shape[0] == 0:
        empty = torch.zeros((0,) + tuple(original_shape), dtype=torch.bool, device=masks.device)
        return labels, torch.zeros(0, 4, device=masks.device), top_scores, empty
    masks = F.interpolate(masks[None], size=padded_shape, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : resized_shape[0], : resized_shape[1]]
    masks = F.interpolate(masks[None], size=original_shape, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, masks_to_boxes(binary), top_scores * mask_scores, binary


class HFMask2FormerDetector:
    """transformers' Mask2Former with mmdet's test-time processing: uint8 RGB image -> raw Detections."""

    def __init__(
        self, model: Any, device: torch.device, *, scale: tuple[int, int] = MMDET_IMG_SCALE,
        min_class_score: float = min(THRESHOLD, COUNTING_THRESHOLD),
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.scale = scale
        self.min_class_score = min_class_score
        self.names = label_map(model.config.id2label)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> dict[str, list[Detection]]:
        pixel_values, resized = mmdet_preprocess(rgb, self.scale)
        out = self.model(pixel_values=pixel_values.to(self.device))
        labels, boxes, scores, masks = mask2former_instances(
            out.class_queries_logits[0], out.masks_queries_logits[0], tuple(pixel_values.shape[-2:]),
            resized, tuple(rgb.shape[:2]), min_class_score=self.min_class_score,
        )
        detections: dict[str, list[Detection]] = {}
        for label, box, score, mask in zip(labels.tolist(), boxes.tolist(), scores.tolist(), masks.cpu().numpy()):
            detections.setdefault(self.names[label], []).append(Detection(box=tuple(box), score=score, mask=mask))
        return detections


class MMDetDetector:
    """The official mmdet 2.x Mask2Former, in an environment that has mmdet 2.x and mmcv-full 1.x."""

    def __init__(self, model: Any) -> None:
        try:
            from mmdet.apis import inference_detector
        except ImportError as e:
            raise ImportError(
                "detector='mmdet' needs mmdet 2.x (with mmcv-full 1.x) in this environment; run it in its own "
                "environment behind the scorer server, or use detector='hf'"
            ) from e
        self.model = model
        self._inference = inference_detector

    @classmethod
    def from_checkpoint(cls, checkpoint: str, config: str | None, device: torch.device) -> MMDetDetector:
        """Build the official config and load the checkpoint's state dict without unpickling objects."""
        import os

        import mmdet
        from mmdet.apis import init_detector

        if config is None:
            config = os.path.join(os.path.dirname(mmdet.__file__), "..", DEFAULT_MMDET_CONFIG)
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"mmdet checkpoint {checkpoint!r} not found; download it as GenEval's "
                "evaluation/download_models.sh does and pass its path as model_id"
            )
        model = init_detector(config, None, device=str(device))
        state = load_weights_file(checkpoint)  # never unpickles objects (safetensors or weights_only)
        # mmcv's load_checkpoint is non-strict; a missing parameter, though, means the wrong checkpoint
        missing, _ = model.load_state_dict(state.get("state_dict", state), strict=False)
        if missing:
            raise ValueError(f"mmdet checkpoint {checkpoint!r} lacks {len(missing)} parameters, e.g. {missing[:3]}")
        return cls(model)

    def __call__(self, rgb: np.ndarray) -> dict[str, list[Detection]]:
        # mmdet takes numpy images as BGR (what mmcv.imread returns for the official PNG files)
        return detections_from_mmdet(self._inference(self.model, np.ascontiguousarray(rgb[:, :, ::-1])))


def color_crop(image: Image.Image, detection: Detection, background: str = GREY_BACKGROUND) -> Image.Image:
    """The official colour crop: the object through its mask over a plain ``background``, cropped to its box.

    Without a mask the image itself is cropped. The box goes to PIL's crop as is (which rounds the floats).
    """
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"detection mask {mask.shape} does not match the image {(image.height, image.width)}")
        image = Image.composite(image, Image.new("RGB", image.size, background), Image.fromarray(mask))
    crop = image.crop(detection.box)
    if crop.width == 0 or crop.height == 0:
        raise ValueError(f"detection box {detection.box} gives an empty crop; its colour cannot be classified")
    return crop


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier on a transformers CLIPModel (clip_benchmark's recipe).

    Per class: for each colour, the 3 templates' text embeddings are L2-normalised, averaged and
    re-normalised; a crop's colour is the argmax of its normalised image embedding against the 10 colours.
    ``amp`` runs both encoders under CUDA fp16 autocast, as clip_benchmark 1.4.0 does by default.
    """

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, *, amp: bool = True) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.amp = amp and device.type == "cuda"
        self._weights: dict[str, torch.Tensor] = {}

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    @torch.no_grad()
    def text_weights(self, classname: str) -> torch.Tensor:
        """(D, 10) classifier weights for ``classname``, cached."""
        if classname not in self._weights:
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, obj=classname) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
                with self._autocast():
                    emb = text_embeddings(
                        self.model, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
                    )
                mean = F.normalize(emb.float(), dim=-1).mean(dim=0)
                columns.append(mean / mean.norm())
            self._weights[classname] = torch.stack(columns, dim=1)
        return self._weights[classname]

    @torch.no_grad()
    def __call__(self, image: Image.Image, classname: str, detections: Sequence[Detection]) -> list[str]:
        if not detections:
            return []
        # crops differ in size: preprocess one by one (PIL bicubic resize + torchvision centre crop, as open_clip)
        pixels = torch.cat([clip_pixel_values(_to_tensor(color_crop(image, d)), 224) for d in detections])
        with self._autocast():
            feats = image_embeddings(self.model, pixels.to(self.device))
        logits = F.normalize(feats.float(), dim=-1) @ self.text_weights(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float [0, 1] (exact on the uint8 grid)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode uint8 RGB as JPEG at ``quality`` (PIL defaults otherwise, as the online reward) and decode."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


class GenEvalScorer:
    """GenEval correctness (1.0 / 0.0 per image; the harness takes the mean of tag means), native scale 0-1.

    Args:
        detector: ``"hf"`` (transformers Mask2Former) or ``"mmdet"`` (official mmdet 2.x, own environment).
        model_id: hub id or local directory of the HF checkpoint; for mmdet, the ``.pth`` checkpoint path.
        detector_factory: returns the detector model (HF Mask2Former, or an mmdet model), instead of loading.
        detect_fn: replaces the detector altogether: uint8 RGB (H, W, 3) -> raw Detections per class name.
        mmdet_config: mmdet config file (default: the official Swin-S config inside the mmdet package).
        color_model_id: hub id or local directory of the CLIP model for colours.
        color_factory: returns ``(clip_model, tokenizer)`` instead of loading.
        color_fn: replaces the colour classifier: (PIL image, class name, detections) -> colours.
        device: torch device (default CUDA when available).
        jpeg_quality: JPEG-encode images at this quality first (75 = the online GenEval reward); None = PNG.
        color_amp: CUDA fp16 autocast for CLIP, as the official clip_benchmark call.
        detector_scale: mmdet's test ``img_scale`` (long, short); change only to make tests fast.
    """

    name = "geneval"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(
        self,
        detector: str = "hf",
        model_id: str | None = None,
        detector_factory: Callable[[], Any] | None = None,
        detect_fn: DetectFn | None = None,
        mmdet_config: str | None = None,
        color_model_id: str = DEFAULT_COLOR_ID,
        color_factory: Callable[[], tuple[Any, Any]] | None = None,
        color_fn: ColorFn | None = None,
        device: str | torch.device | None = None,
        jpeg_quality: int | None = None,
        color_amp: bool = True,
        detector_scale: tuple[int, int] = MMDET_IMG_SCALE,
    ) -> None:
        if detector not in ("hf", "mmdet"):
            raise ValueError(f"GenEvalScorer: detector must be 'hf' or 'mmdet', got {detector!r}")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"GenEvalScorer: jpeg_quality must be in 1..100 or None, got {jpeg_quality!r}")
        self.device = resolve_device(device)
        self.jpeg_quality = None if jpeg_quality is None else int(jpeg_quality)
        if model_id is None:
            model_id = DEFAULT_DETECTOR_ID if detector == "hf" else DEFAULT_MMDET_CHECKPOINT
        if detect_fn is not None:
            self._detect, detector_desc = detect_fn, "custom"
        elif detector == "hf":
            if detector_factory is not None:
                model, detector_desc = detector_factory(), "hf:factory"
            else:
                from transformers import Mask2FormerForUniversalSegmentation

                model = from_pretrained(
                    Mask2FormerForUniversalSegmentation.from_pretrained, model_id,
                    what="GenEval detector (Mask2Former)", param="model_id",
                )
                detector_desc = f"hf:{model_id}"
            self._detect = HFMask2FormerDetector(model, self.device, scale=tuple(detector_scale))
        elif detector_factory is not None:
            self._detect, detector_desc = MMDetDetector(detector_factory()), "mmdet:factory"
        else:
            self._detect = MMDetDetector.from_checkpoint(model_id, mmdet_config, self.device)
            detector_desc = f"mmdet:{model_id}"
        if color_fn is not None:
            self._color, color_desc = color_fn, "custom"
        else:
            if color_factory is not None:
                (clip_model, tokenizer), color_desc = color_factory(), "factory"
            else:
                from transformers import AutoTokenizer, CLIPModel

                what = "GenEval colour classifier (CLIP)"
                clip_model = from_pretrained(
                    CLIPModel.from_pretrained, color_model_id, what=what, param="color_model_id"
                )
                tokenizer = from_pretrained(
                    AutoTokenizer.from_pretrained, color_model_id, what=what, param="color_model_id"
                )
                color_desc = color_model_id
            self._color = ClipColorClassifier(clip_model, tokenizer, self.device, amp=color_amp)
        jpeg = "png" if self.jpeg_quality is None else f"jpeg{self.jpeg_quality}"
        # official only with every learned part official: mmdet 2.x's checkpoint *and* open_clip's colour model;
        # our colour classifier is a transformers port (tests/parity/check_openclip.py), so never official here
        engine = "mmdet" if detector == "mmdet" and detect_fn is None else "flowopd-port"
        engine_version = (
            package_version("mmdet") if engine == "mmdet" else f"transformers-{package_version('transformers')}"
        )
        self.version = (
            f"geneval-1;detector={detector_desc};color={color_desc};input={jpeg};resize={resize_backend()};"
            + engine_fields(
                engine, engine_version, f"{detector_desc}+{color_desc}".replace(";", ","), "fp32", official=False)
        )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        """Score each image against its GenEval metadata (tag / include / exclude / prompt)."""
        arrays = to_uint8_hwc(check_images(images))
        if not len(arrays) == len(prompts) == len(metadata):
            raise ValueError(
                f"GenEvalScorer.score: {len(arrays)} images, {len(prompts)} prompts, {len(metadata)} metadata"
            )
        scores, tags, correct, reasons = [], [], [], []
        for rgb, meta in zip(arrays, metadata):
            if self.jpeg_quality is not None:
                rgb = jpeg_roundtrip(rgb, self.jpeg_quality)
            image = Image.fromarray(rgb)
            result = score_geneval(
                meta, self._detect(rgb), classify_colors=lambda cls, dets, im=image: self._color(im, cls, dets)
            )
            scores.append(1.0 if result.correct else 0.0)
            tags.append(str(meta["tag"]))
            correct.append(bool(result.correct))
            reasons.append(result.reason)
        return ScoreBatch(np.asarray(scores), {"tag": tags, "correct": correct, "reason": reasons})
