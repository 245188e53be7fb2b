"""The OCR accuracy scorer: an OCR engine reads each image, Flow-GRPO's rule scores it (METHOD.md section 5).

Official (yifan123/flow_grpo ``flow_grpo/ocr.py``): PaddleOCR 2.x, English, no angle classifier
(``PaddleOCR(use_angle_cls=False, lang="en").ocr(img, cls=False)``), pieces with confidence > 0 joined
without separator; the rule (``flowopd.scorers.ocr_rules``) takes the first double-quoted text of the prompt.

Engines:
- ``"auto"`` (default): ``"paddleocr"`` when PaddleOCR is installed and its English models are present (in the
  ``*_model_dir`` options or PaddleOCR's own cache, ``~/.paddleocr/whl/``), ``"rapidocr"`` otherwise; the engine
  chosen is recorded in ``version`` (``engine=...;official=...``) and so in results.json;
- ``"rapidocr"``: rapidocr-onnxruntime, PP-OCRv4 detection + recognition ONNX models shipped in the wheel (fully
  offline, no torch; Chinese+English recogniser), configured with PaddleOCR 2.x's detection defaults;
- ``"paddleocr"``: the official engine (Flow-GRPO: ``paddleocr==2.9.1``, ``lang="en"``), imported lazily; both the
  2.x API (``.ocr(img, cls=False)``) and the 3.x API (``.predict(img)``) are supported.

Channel order: both engines read a numpy array as BGR (OpenCV's order). Flow-GRPO hands PaddleOCR the RGB
array as is, so the official engine sees red and blue swapped; ``channel_order="rgb"`` (default) reproduces
that, ``"bgr"`` gives the engines their documented order. docs/scorers/geneval_ocr.md has the details.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import Scale, ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.engine import engine_fields
from flowopd.scorers.ocr_rules import MIN_CONFIDENCE, ocr_accuracy, target_text

ENGINES = ("auto", "rapidocr", "paddleocr")
OFFICIAL_PADDLEOCR = "2.9.1"  # Flow-GRPO's README: pip install paddleocr==2.9.1

# PaddleOCR 2.x's defaults (tools/infer/utility.py init_args, predict_det.py) given to RapidOCR, whose own
# defaults differ (min-side 736 resize, box_thresh 0.5, unclip 1.6, dilation, mean/std 0.5).
RAPIDOCR_PADDLE2_OPTIONS: dict[str, Any] = {
    "det_limit_side_len": 960,
    "det_limit_type": "max",
    "det_thresh": 0.3,
    "det_box_thresh": 0.6,
    "det_unclip_ratio": 1.5,
    "det_use_dilation": False,
    "det_score_mode": "fast",
    "det_mean": [0.485, 0.456, 0.406],
    "det_std": [0.229, 0.224, 0.225],
    "text_score": 0.5,  # PaddleOCR's drop_score
}

Piece = tuple[str, float]


def _package_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not-installed"


def parse_rapidocr(result: Any) -> list[Piece]:
    """RapidOCR's ``(result, elapse)`` -> (text, confidence) pieces; result is None or [[box, text, score], ...]."""
    lines = result[0] if isinstance(result, tuple) else result
    if not lines:
        return []
    return [(str(line[1]), float(line[2])) for line in lines]


def parse_paddleocr2(result: Any) -> list[Piece]:
    """PaddleOCR 2.x ``ocr(img, cls=False)`` for one image -> pieces.

    The result is a list with one entry per image: a list of ``[box, (text, confidence)]`` lines, or None
    when nothing was found (``[None]``).
    """
    if not result or result[0] is None:
        return []
    return [(str(line[1][0]), float(line[1][1])) for line in result[0]]


def parse_paddleocr3(result: Any) -> list[Piece]:
    """PaddleOCR 3.x ``predict(img)`` for one image -> pieces.

    The result is a list of OCRResult mappings (one per image) with parallel ``rec_texts`` and
    ``rec_scores``; their ``.json`` form nests them under ``"res"``.
    """
    if not result:
        return []
    page = result[0]
    if "rec_texts" not in page and "res" in page:
        page = page["res"]
    texts, scores = list(page["rec_texts"]), list(page["rec_scores"])
    if len(texts) != len(scores):
        raise ValueError(f"PaddleOCR 3.x result has {len(texts)} rec_texts but {len(scores)} rec_scores")
    return [(str(t), float(s)) for t, s in zip(texts, scores)]


def parse_paddleocr(result: Any) -> list[Piece]:
    """Either PaddleOCR API's result for one image (3.x pages are mappings, 2.x pages are lists or None)."""
    if result and isinstance(result[0], Mapping):
        return parse_paddleocr3(result)
    return parse_paddleocr2(result)


def _build_rapidocr(device: str | None, options: Mapping[str, Any]) -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError("engine='rapidocr' needs rapidocr-onnxruntime: pip install 'flowopd[ocr]'") from e
    cuda = {"det_use_cuda": True, "cls_use_cuda": True, "rec_use_cuda": True} if _is_gpu(device) else {}
    return RapidOCR(**{**RAPIDOCR_PADDLE2_OPTIONS, **cuda, **options})


def _build_paddleocr(device: str | None, options: Mapping[str, Any]) -> Any:
    try:
        from paddleocr import PaddleOCR
    except ImportError as e:
        raise ImportError(
            "engine='paddleocr' needs paddleocr and paddlepaddle (official: paddleocr==2.9.1, "
            "paddlepaddle-gpu==2.6.2): pip install 'flowopd[paddleocr]', or use engine='rapidocr'"
        ) from e
    major = int(_package_version("paddleocr").split(".")[0])
    if major >= 3:  # 3.x renamed the angle classifier and added document pre-processing, on by default
        base = {
            "lang": "en", "use_textline_orientation": False, "use_doc_orientation_classify": False,
            "use_doc_unwarping": False, "device": "gpu" if _is_gpu(device) else "cpu",
        }
    else:
        base = {"use_angle_cls": False, "lang": "en", "use_gpu": _is_gpu(device), "show_log": False}
    return PaddleOCR(**{**base, **options})


def paddleocr_model_dirs(options: Mapping[str, Any] | None = None, lang: str = "en") -> dict[str, str]:
    """The det / rec / cls model directories PaddleOCR 2.x would load (the options' or its default cache's).

    Raises ImportError when PaddleOCR 2.x is not installed.
    """
    options = dict(options or {})
    if _package_version("paddleocr").split(".")[0] not in ("2", "not-installed"):
        raise ImportError("paddleocr 3.x manages its models itself; engine='auto' looks for PaddleOCR 2.x")
    from paddleocr import paddleocr as module
    rec_lang, det_lang = module.parse_lang(options.get("lang", lang))
    version = options.get("ocr_version", module.DEFAULT_OCR_MODEL_VERSION)
    dirs = {}
    for kind, kind_lang, default in (("det", det_lang, det_lang), ("rec", rec_lang, rec_lang), ("cls", "ch", "")):
        config = module.get_model_config("OCR", version, kind, kind_lang)
        base = os.path.join(module.BASE_DIR, "whl", kind, default) if default else (
            os.path.join(module.BASE_DIR, "whl", kind)
        )
        dirs[kind], _ = module.confirm_model_dir_url(options.get(f"{kind}_model_dir"), base, config["url"])
    return dirs


def choose_engine(engine: str, options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(engine, why) for ``engine`` ("auto" resolves to paddleocr when it can run offline, else rapidocr)."""
    if engine != "auto":
        return engine, "requested"
    try:
        dirs = paddleocr_model_dirs(options)
    except ImportError as e:
        return "rapidocr", f"paddleocr unavailable ({str(e).splitlines()[0][:80]})"
    missing = [d for d in dirs.values() if not all(
        os.path.isfile(os.path.join(d, f)) for f in ("inference.pdmodel", "inference.pdiparams"))]
    if missing:
        return "rapidocr", f"paddleocr models missing in {missing[0]}"
    return "paddleocr", "paddleocr and its models present"


def _is_gpu(device: str | None) -> bool:
    return device is not None and str(device).split(":")[0] in ("cuda", "gpu")


class OCRScorer:
    """OCR accuracy in [0, 1] per image (1 - clipped edit distance / target length), native scale 0-1.

    Args:
        engine: ``"auto"`` (paddleocr when installed with its models, else rapidocr), ``"rapidocr"`` or
            ``"paddleocr"``.
        engine_factory: returns the engine object (a RapidOCR, or a PaddleOCR of either API) instead of
            building it; tests inject fakes that replay recorded outputs.
        channel_order: order of the array handed to the engine, ``"rgb"`` (as Flow-GRPO does) or ``"bgr"``.
        device: ``None``/``"cpu"`` or ``"cuda"`` (PaddleOCR GPU build, or onnxruntime-gpu for RapidOCR).
        engine_options: extra keyword arguments for the engine's constructor.
    """

    name = "ocr"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(
        self,
        engine: str = "auto",
        engine_factory: Callable[[], Any] | None = None,
        channel_order: str = "rgb",
        device: str | torch.device | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"OCRScorer: engine must be one of {ENGINES}, got {engine!r}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"OCRScorer: channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.channel_order = channel_order
        device = None if device is None else str(device)
        if engine_factory is not None:
            self.engine = engine_factory()
            if engine == "auto":  # an injected engine: its API says which it is
                engine = "paddleocr" if hasattr(self.engine, "ocr") or hasattr(self.engine, "predict") else "rapidocr"
            self.engine_reason = "factory"
        else:
            engine, self.engine_reason = choose_engine(engine, engine_options)
        self.engine_name = engine
        if engine_factory is None:
            build = _build_rapidocr if engine == "rapidocr" else _build_paddleocr
            self.engine = build(device, engine_options or {})
        if engine == "rapidocr":
            distribution, engine_version = "rapidocr-onnxruntime", _package_version("rapidocr-onnxruntime")
            checkpoint = "PP-OCRv4 ch det+rec (ONNX, in the wheel)"
        else:
            distribution, engine_version = "paddleocr", _package_version("paddleocr")
            custom = sorted(k for k in (engine_options or {}) if k.endswith("_model_dir"))
            checkpoint = f"lang={(engine_options or {}).get('lang', 'en')}" + (
                f",custom {'/'.join(custom)}" if custom else ""
            )
        package = f"{distribution} {engine_version}" + (
            f" paddlepaddle {_package_version('paddlepaddle')}" if engine == "paddleocr" else "")
        source = "factory" if engine_factory is not None else "default"
        # official: Flow-GRPO's version and language, with PaddleOCR's own (downloaded) models
        official = (engine == "paddleocr" and engine_version == OFFICIAL_PADDLEOCR and engine_factory is None
                    and (engine_options or {}).get("lang", "en") == "en" and "custom" not in checkpoint)
        self.version = f"ocr-1;engine={engine};{package};{source};input={channel_order};" + engine_fields(
            distribution, engine_version, "injected" if engine_factory is not None else checkpoint,
            "fp32", official)

    def read(self, rgb: np.ndarray) -> list[Piece]:
        """Recognised (text, confidence) pieces of one uint8 RGB (H, W, 3) image, in the engine's order."""
        array = np.ascontiguousarray(rgb[:, :, ::-1]) if self.channel_order == "bgr" else rgb
        if self.engine_name == "rapidocr":
            return parse_rapidocr(self.engine(array, use_cls=False))
        if hasattr(self.engine, "predict"):  # PaddleOCR 3.x (its .ocr is a deprecated alias of .predict)
            return parse_paddleocr(self.engine.predict(array))
        return parse_paddleocr(self.engine.ocr(array, cls=False))

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        """OCR accuracy of each image against the quoted text of its prompt."""
        arrays = to_uint8_hwc(check_images(images))
        if len(arrays) != len(prompts):
            raise ValueError(f"OCRScorer.score: {len(arrays)} images for {len(prompts)} prompts")
        scores, texts, targets = [], [], []
        for rgb, prompt in zip(arrays, prompts):
            target = target_text(prompt)  # fails before OCR when the prompt has no quoted text
            pieces = self.read(rgb)
            recognised = [t for t, _ in pieces]
            confidences = [c for _, c in pieces]
            scores.append(ocr_accuracy(prompt, recognised, confidences))
            texts.append("".join(t for t, c in pieces if c > MIN_CONFIDENCE))
            targets.append(target)
        return ScoreBatch(np.asarray(scores), {"text": texts, "target": targets})
