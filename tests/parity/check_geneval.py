"""GenEval detection-to-score: mmdet's Mask2Former (pre-processing, head outputs, instance post-processing) vs
flowopd.scorers.geneval (``mmdet_preprocess``, ``mask2former_instances``) feeding our rules (``score_geneval``).

The official GenEval environment (mmdet 2.27 + mmcv-full 1.7 with compiled CUDA ops, torch 1.12) does not install
here; mmdet 3.3 with mmcv-lite (no compiled ops; ``mmcv._ext`` replaced by a stub whose every op raises) does.
Official side: the shipped ``mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py`` (GenEval's architecture: Swin-S
Mask2Former, COCO instance) built on seeded random weights (the backbone's pretrained init dropped; the class
head scaled so that some classes pass the 0.3 / 0.9 thresholds), run with mmdet's test pipeline on the PNG
files, with one change that restores mmdet 2.x's behaviour: images are loaded as uint8 (``to_float32=False``;
mmdet 3's config resizes float32 images, 2.x resized uint8). A hook records the head's last-layer class and mask
logits; mmdet's own ``predict`` gives the instances. Ours: the same logits through ``mask2former_instances``, and
the PNGs through ``mmdet_preprocess``. Both sets of detections then go through ``score_geneval`` with metadata
written from the detected classes (counting, colour, position and exclusion clauses) and one colour function.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
from common import load_json, make_images, max_abs_diff, perturb_, seed_everything

TOLERANCE = 1e-4
WHY = "scores are probabilities (0-1) computed in fp32 from the same logits"
# random features give ~1/81 per class and mask logits near 0: sharper class and mask heads make detections pass
# both rule thresholds (0.3, and 0.9 for counting)
CLS_SCALE = 60.0
MASK_SCALE = 8.0
STUB_CALLS: list[str] = []


class _StubExt(types.ModuleType):
    """``mmcv._ext`` without compiled code: every op is a function that records and raises."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            STUB_CALLS.append(name)
            raise RuntimeError(f"mmcv._ext.{name}: compiled op called (stubbed in the parity check)")

        return op


def _official_model():
    import importlib.machinery

    import mmdet
    from mmengine.config import Config

    stub = _StubExt("mmcv._ext")
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)  # no loader: mmengine sees no mmcv-full
    sys.modules.setdefault("mmcv._ext", stub)
    from mmdet.apis import init_detector
    from mmdet.utils import register_all_modules

    register_all_modules()
    config = (Path(mmdet.__file__).parent / ".mim" / "configs" / "mask2former"
              / "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py")
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    cfg.test_dataloader.dataset.pipeline[0]["to_float32"] = False  # mmdet 2.x loads (and resizes) uint8
    cfg.test_dataloader.dataset.pipeline = [
        p for p in cfg.test_dataloader.dataset.pipeline if p["type"] != "LoadAnnotations"
    ]
    seed_everything()
    model = init_detector(cfg, None, device="cpu").eval()
    return model, cfg, config.name


def official(work: Path) -> dict:
    import torch
    from mmcv.transforms import Compose
    from safetensors.torch import save_file

    model, cfg, config_name = _official_model()
    perturb_(model)
    with torch.no_grad():
        model.panoptic_head.cls_embed.weight.mul_(CLS_SCALE)
        model.panoptic_head.mask_embed[-1].weight.mul_(MASK_SCALE)
    captured = {}
    model.panoptic_head.register_forward_hook(lambda m, i, out: captured.update(cls=out[0][-1], mask=out[1][-1]))
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    here = work / "geneval"
    here.mkdir(parents=True, exist_ok=True)
    per_image = []
    for i, path in enumerate(make_images(work)):
        data = pipeline({"img_path": str(path), "img_id": i})
        batch = model.data_preprocessor({"inputs": [data["inputs"]], "data_samples": [data["data_samples"]]}, False)
        with torch.no_grad():
            result = model.predict(batch["inputs"], batch["data_samples"])[0].pred_instances
        meta = batch["data_samples"][0].metainfo
        tensors = {"inputs": batch["inputs"][0].float().contiguous(), "cls": captured["cls"][0].contiguous(),
                   "mask": captured["mask"][0].contiguous()}
        save_file(tensors, str(here / f"image{i}.safetensors"))
        np.savez_compressed(here / f"image{i}_masks.npz",
                            masks=np.packbits(result.masks.cpu().numpy().astype(bool), axis=-1))
        per_image.append({
            "batch_input_shape": list(meta["batch_input_shape"]), "img_shape": list(meta["img_shape"]),
            "ori_shape": list(meta["ori_shape"]), "labels": result.labels.tolist(), "scores": result.scores.tolist(),
            "bboxes": result.bboxes.tolist(),
        })
    import mmcv
    import mmdet

    return {"images": per_image, "config": config_name, "stub_calls": sorted(set(STUB_CALLS)),
            "package": f"mmdet {mmdet.__version__} + mmcv-lite {mmcv.__version__}"}


def _metadata(detections: dict[str, list]) -> list[dict]:
    """GenEval-style metadata exercising every rule on the classes the official detector found."""
    classes = sorted(detections, key=lambda c: -max(d.score for d in detections[c]))
    a = classes[0] if classes else "cat"
    b = classes[1] if len(classes) > 1 else "dog"
    absent = next(c for c in ("toothbrush", "hair drier", "parking meter", "cat") if c not in detections)
    return [
        {"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"},
        {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
         "prompt": f"{a} and {b}"},
        {"tag": "counting", "include": [{"class": a, "count": 2}], "exclude": [{"class": a, "count": 3}],
         "prompt": f"two {a}s"},
        {"tag": "colors", "include": [{"class": a, "count": 1, "color": "red"}], "prompt": f"a red {a}"},
        {"tag": "position",
         "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": ["right of", 0]}],
         "prompt": f"a {a} right of a {b}"},
        {"tag": "color_attr",
         "include": [{"class": a, "count": 1, "color": "blue"}, {"class": b, "count": 1, "color": "red"}],
         "prompt": f"a blue {a} and a red {b}"},
        {"tag": "single_object", "include": [{"class": absent, "count": 1}], "prompt": f"a photo of a {absent}"},
    ]


def _colour(classname: str, dets: list) -> list[str]:
    """A deterministic stand-in for CLIP (the colour classifier is compared in check_openclip)."""
    from flowopd.scorers.geneval_rules import COLORS

    return [COLORS[int(sum(d.box)) % len(COLORS)] for d in dets]


def _detections(labels, boxes, scores, masks) -> dict[str, list]:
    from flowopd.scorers.geneval import OBJECT_NAMES
    from flowopd.scorers.geneval_rules import Detection

    out: dict[str, list] = {}
    for label, box, score, mask in zip(labels, boxes, scores, masks):
        out.setdefault(OBJECT_NAMES[int(label)], []).append(
            Detection(box=tuple(float(v) for v in box), score=float(score), mask=mask))
    return out


def ours(work: Path) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from flowopd.scorers.geneval import mask2former_instances, mmdet_preprocess
    from flowopd.scorers.geneval_rules import score_geneval

    official_side = load_json(work / "geneval" / "official-torch.json")
    here = work / "geneval"
    out = []
    for i, (path, meta) in enumerate(zip(make_images(work), official_side["images"])):
        tensors = load_file(str(here / f"image{i}.safetensors"))
        rgb = np.asarray(Image.open(path).convert("RGB"))
        pixels, resized = mmdet_preprocess(rgb)
        official_inputs = tensors["inputs"]  # mmdet's data_preprocessor output: RGB, normalised, padded
        labels, boxes, scores, masks = mask2former_instances(
            tensors["cls"], tensors["mask"], tuple(meta["batch_input_shape"]), tuple(meta["img_shape"][:2]),
            tuple(meta["ori_shape"][:2]), min_class_score=0.0)
        order = torch.argsort(scores, descending=True)
        official_order = np.argsort(-np.asarray(meta["scores"]))
        packed = np.load(here / f"image{i}_masks.npz")["masks"]
        official_masks = np.unpackbits(packed, axis=-1)[..., : rgb.shape[1]].astype(bool)
        ours_masks = masks[order].cpu().numpy()
        theirs = _detections(np.asarray(meta["labels"])[official_order], np.asarray(meta["bboxes"])[official_order],
                             np.asarray(meta["scores"])[official_order], official_masks[official_order])
        mine = _detections(labels[order].tolist(), boxes[order].tolist(), scores[order].tolist(), ours_masks)
        metadata = _metadata(
            {c: [d for d in ds if d.score > 0.3] for c, ds in theirs.items() if any(d.score > 0.3 for d in ds)})
        correct_official = [score_geneval(m, theirs, classify_colors=_colour).correct for m in metadata]
        correct_ours = [score_geneval(m, mine, classify_colors=_colour).correct for m in metadata]
        same_shape = list(pixels.shape[1:]) == list(official_inputs.shape)
        out.append({
            "shape_equal": list(pixels.shape) == list(official_inputs[None].shape),
            "resized_equal": list(resized) == list(meta["img_shape"][:2]),
            "pixel_max_abs_diff": float((pixels[0] - official_inputs).abs().max()) if same_shape else None,
            "pixel_fraction_diff": float(((pixels[0] - official_inputs).abs() > 1e-4).float().mean())
            if same_shape else None,
            "labels_equal": labels[order].tolist() == np.asarray(meta["labels"])[official_order].tolist(),
            "scores_ours": scores[order].tolist(),
            "scores_official": np.asarray(meta["scores"])[official_order].tolist(),
            "box_max_abs_diff": max_abs_diff(boxes[order].numpy(), np.asarray(meta["bboxes"])[official_order]),
            "mask_pixels_differing": int((ours_masks != official_masks[official_order]).sum()),
            "n_above_03": int((scores > 0.3).sum()), "n_above_09": int((scores > 0.9).sum()),
            "correct_official": correct_official, "correct_ours": correct_ours,
        })
    return {"images": out}


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o = load_json(work / "geneval" / "official-torch.json")
    u = load_json(work / "geneval" / "ours.json")["images"]
    score_diff = max(max_abs_diff(x["scores_ours"], x["scores_official"]) for x in u)
    box_diff = max(x["box_max_abs_diff"] for x in u)
    labels_ok = all(x["labels_equal"] for x in u)
    masks = sum(x["mask_pixels_differing"] for x in u)
    n_cand = sum(len(x["scores_ours"]) for x in u)
    above = sum(x["n_above_03"] for x in u), sum(x["n_above_09"] for x in u)
    correct = [c for x in u for c in x["correct_ours"]], [c for x in u for c in x["correct_official"]]
    rule_diff = max_abs_diff(np.asarray(correct[0], float), np.asarray(correct[1], float))
    pix = [x["pixel_max_abs_diff"] for x in u]
    note_pix = (f"values differing: {max(x['pixel_fraction_diff'] or 0 for x in u):.1%} at most (1 grey level = 0.017 "
                f"in normalised units)" if all(p is not None for p in pix) else "padded shapes differ")
    stub = f"stubbed compiled ops called: {o['stub_calls']}" if o["stub_calls"] else "no stubbed compiled op was called"
    return [
        {"scorer": "geneval", "quantity": "pre-processing (resize, normalise, pad)", "n": len(u),
         "max_abs_diff": max((p for p in pix if p is not None), default=None), "tolerance": 1e-5,
         "ok": (all(x["shape_equal"] and x["resized_equal"] for x in u)
                and all(p is not None and p <= 1e-5 for p in pix)),
         "note": note_pix},
        {"scorer": "geneval", "quantity": f"instance scores, top-100 candidates ({above[0]} > 0.3)", "n": n_cand,
         "max_abs_diff": score_diff, "tolerance": TOLERANCE, "ok": score_diff <= TOLERANCE and labels_ok,
         "note": f"{o['package']}, {o['config']}; labels {'equal' if labels_ok else 'DIFFER'}; {stub}"},
        {"scorer": "geneval", "quantity": "instance boxes (px) / mask pixels differing", "n": n_cand,
         "max_abs_diff": box_diff, "tolerance": 0.0, "ok": box_diff == 0 and masks == 0,
         "note": f"{masks} mask pixels differ in all"},
        {"scorer": "geneval", "quantity": f"GenEval rule correctness ({above[1]} dets > 0.9)", "n": len(correct[0]),
         "max_abs_diff": rule_diff, "tolerance": 0.0, "ok": rule_diff == 0,
         "note": f"{sum(correct[1])} of {len(correct[1])} official clauses sets correct"},
    ]



