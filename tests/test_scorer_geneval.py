"""GenEvalScorer: detector glue (HF Mask2Former post-processing, mmdet output), colour crops and classifier,
the full detection -> rule path on hand-made detections, and a tiny random Mask2Former + CLIP end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer, to_uint8_hwc
from flowopd.scorers.geneval import (
    COLOR_TEMPLATES,
    DEFAULT_COLOR_ID,
    DEFAULT_DETECTOR_ID,
    LABEL_ALIASES,
    OBJECT_NAMES,
    ClipColorClassifier,
    GenEvalScorer,
    color_crop,
    detections_from_mmdet,
    jpeg_roundtrip,
    label_map,
    mask2former_instances,
    masks_to_boxes,
    mmdet_preprocess,
    mmdet_rescale_shape,
)
from flowopd.scorers.geneval_rules import COLORS, Detection

# The id2label of the HF COCO-instance checkpoints (huggingface/label-files coco-detection-mmdet-id2label.json,
# mmdet's CLASSES) and of Darknet's coco.names: the two other spellings in use.
MMDET_NAMES = list(OBJECT_NAMES)
for _i, _name in ((64, "mouse"), (65, "remote"), (66, "keyboard")):
    MMDET_NAMES[_i] = _name
DARKNET_NAMES = list(MMDET_NAMES)
for _i, _name in ((3, "motorbike"), (4, "aeroplane"), (57, "sofa"), (58, "pottedplant"), (60, "diningtable"),
                  (62, "tvmonitor")):
    DARKNET_NAMES[_i] = _name


def data_dir() -> Path:
    env = os.environ.get("FLOWOPD_DATA_DIR")
    return Path(env) if env else Path(__file__).parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------------------------- class names


def test_object_names_are_genevals_file():
    path = data_dir() / "geneval" / "object_names.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    assert tuple(line.strip() for line in path.read_text().splitlines() if line.strip()) == OBJECT_NAMES


@pytest.mark.parametrize("names", [MMDET_NAMES, DARKNET_NAMES, list(OBJECT_NAMES), [n.upper() for n in MMDET_NAMES]])
def test_label_map_covers_every_geneval_name_in_index_order(names):
    mapping = label_map({str(i): n for i, n in enumerate(names)})
    assert set(mapping.values()) == set(OBJECT_NAMES)
    assert [mapping[i] for i in range(80)] == list(OBJECT_NAMES)  # same class order as object_names.txt


def test_label_aliases_only_name_geneval_classes():
    assert set(LABEL_ALIASES.values()) <= set(OBJECT_NAMES)
    assert not set(LABEL_ALIASES) & set(OBJECT_NAMES)


def test_label_map_generic_labels_use_index_order_and_bad_labels_fail():
    assert label_map({i: f"LABEL_{i}" for i in range(80)}) == dict(enumerate(OBJECT_NAMES))
    with pytest.raises(ValueError, match="id2label\\[5\\] = 'spaceship'"):
        label_map({i: ("spaceship" if i == 5 else n) for i, n in enumerate(MMDET_NAMES)})
    with pytest.raises(ValueError, match="133 labels"):
        label_map({i: f"LABEL_{i}" for i in range(133)})  # a panoptic checkpoint
    with pytest.raises(ValueError, match="does not cover"):
        label_map({i: ("cat" if i == 16 else n) for i, n in enumerate(MMDET_NAMES)})  # dog missing


# ----------------------------------------------------------------------------------------------- mmdet glue


def test_detections_from_mmdet_hand_built_result():
    h, w = 20, 30
    bbox = [np.zeros((0, 5), np.float32) for _ in OBJECT_NAMES]
    segm = [[] for _ in OBJECT_NAMES]
    cat, dog = OBJECT_NAMES.index("cat"), OBJECT_NAMES.index("dog")
    bbox[cat] = np.array([[1, 2, 10, 12, 0.95], [15, 2, 25, 12, 0.4]], np.float32)
    m0, m1 = np.zeros((h, w), bool), np.zeros((h, w), bool)
    m0[2:12, 1:10], m1[2:12, 15:25] = True, True
    segm[cat] = [m0, m1]
    bbox[dog] = np.array([[0, 0, 5, 5, 0.2]], np.float32)
    segm[dog] = [np.ones((h, w), bool)]
    out = detections_from_mmdet((bbox, segm))
    assert set(out) == {"cat", "dog"}
    assert [d.box for d in out["cat"]] == [(1.0, 2.0, 10.0, 12.0), (15.0, 2.0, 25.0, 12.0)]
    assert out["cat"][0].score == pytest.approx(0.95) and out["dog"][0].score == pytest.approx(0.2)
    assert np.array_equal(out["cat"][1].mask, m1) and out["cat"][1].mask.dtype == bool
    # bbox-only results (no segm) keep boxes without masks
    assert all(d.mask is None for d in detections_from_mmdet(bbox)["cat"])
    with pytest.raises(ValueError, match="2 boxes but 1 masks"):
        detections_from_mmdet((bbox, [[m0] if i == cat else s for i, s in enumerate(segm)]))
    with pytest.raises(ValueError, match="79 classes"):
        detections_from_mmdet((bbox[:79], segm[:79]))


def test_mmdet_backend_needs_mmdet():
    try:
        import mmdet  # noqa: F401

        pytest.skip("mmdet is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="mmdet 2.x"):
        GenEvalScorer(detector="mmdet", detector_factory=object, color_fn=lambda *a: [], device="cpu")


# ----------------------------------------------------------------------------------------------- HF detector glue


def test_mmdet_rescale_and_preprocess():
    assert mmdet_rescale_shape(512, 512) == (800, 800)
    assert mmdet_rescale_shape(300, 500) == (800, 1333)
    assert mmdet_rescale_shape(1000, 1000) == (800, 800)
    rgb = np.full((30, 50, 3), (200, 100, 50), np.uint8)
    x, resized = mmdet_preprocess(rgb, scale=(100, 60))
    assert resized == (60, 100) and tuple(x.shape) == (1, 3, 64, 128)  # padded to multiples of 32
    expected = (torch.tensor([200.0, 100.0, 50.0]) - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor(
        [58.395, 57.12, 57.375]
    )
    assert torch.allclose(x[0, :, :60, :100].mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.all(x[0, :, 60:, :] == 0) and torch.all(x[0, :, :, 100:] == 0)  # zero padding after normalising


def test_masks_to_boxes_is_mask2bbox():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 5, 7] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 4.0], [7.0, 5.0, 8.0, 6.0], [0.0, 0.0, 0.0, 0.0]]


def test_mask2former_instances_scores_boxes_and_pruning():
    # 3 queries, 2 classes + no-object; padded 8x8 input = resized image = original (no rescaling)
    class_logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    mask_logits = torch.full((3, 8, 8), -4.0)
    mask_logits[0, 2:6, 1:4] = 2.0
    mask_logits[1, 0:2, 5:8] = 1.0  # query 2 keeps an empty mask
    labels, boxes, scores, masks = mask2former_instances(class_logits, mask_logits, (8, 8), (8, 8), (8, 8))
    probs = torch.softmax(class_logits, -1)[:, :-1]
    query_boxes = [[1.0, 2.0, 4.0, 6.0], [5.0, 0.0, 8.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    mask_score = [float(torch.sigmoid(torch.tensor(v))) for v in (2.0, 1.0)] + [0.0]
    expected = sorted(
        (c, round(float(probs[q, c]) * mask_score[q], 6), query_boxes[q]) for q in range(3) for c in range(2)
    )
    got = sorted((lab, round(sc, 6), bx) for lab, sc, bx in zip(labels.tolist(), scores.tolist(), boxes.tolist()))
    assert got == expected
    assert masks.dtype == torch.bool and masks.shape == (6, 8, 8)
    # pruning by class probability drops nothing that could pass a 0.3 score threshold
    pruned = mask2former_instances(class_logits, mask_logits, (8, 8), (8, 8), (8, 8), min_class_score=0.3)
    assert len(pruned[0]) < len(labels)
    assert sorted(s for s in pruned[2].tolist() if s > 0.3) == pytest.approx(
        sorted(s for s in scores.tolist() if s > 0.3)
    )


def test_mask2former_instances_upsamples_like_mmdet():
    # logits at 1/4 resolution of a 16x16 padded input whose valid region is 12x16, original image 6x8
    mask_logits = torch.full((1, 4, 4), -5.0)
    mask_logits[0, :, :2] = 5.0
    labels, boxes, scores, masks = mask2former_instances(
        torch.tensor([[5.0, -5.0]]), mask_logits, (16, 16), (12, 16), (6, 8)
    )
    assert masks.shape == (1, 6, 8) and labels.tolist() == [0]
    assert masks[0, :, :4].all() and not masks[0, :, 4:].any()  # left half, back at the original size
    assert boxes.tolist() == [[0.0, 0.0, 4.0, 6.0]]


# ----------------------------------------------------------------------------------------------- colour


def test_color_crop_composites_on_grey_and_crops_to_box():
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red everywhere
    image = Image.fromarray(rgb)
    mask = np.zeros((10, 12), bool)
    mask[3:7, 4:9] = True
    crop = color_crop(image, Detection(box=(2.0, 2.0, 10.0, 8.0), score=0.9, mask=mask))
    out = np.asarray(crop)
    assert out.shape == (6, 8, 3)
    inside = mask[2:8, 2:10]
    assert (out[inside] == (200, 0, 0)).all()
    assert (out[~inside] == (153, 153, 153)).all()  # #999
    # float boxes go through PIL's rounding; no mask = plain crop
    plain = np.asarray(color_crop(image, Detection(box=(1.4, 0.6, 5.5, 3.2), score=0.9)))
    assert plain.shape == (2, 5, 3) and (plain == (200, 0, 0)).all()
    with pytest.raises(ValueError, match="does not match the image"):
        color_crop(image, Detection(box=(0, 0, 4, 4), score=0.9, mask=np.ones((4, 4), bool)))
    with pytest.raises(ValueError, match="empty crop"):
        color_crop(image, Detection(box=(3.0, 3.0, 3.0, 5.0), score=0.9))


PALETTE = {
    "red": (220, 20, 20), "orange": (255, 140, 0), "yellow": (250, 240, 20), "green": (20, 180, 40),
    "blue": (20, 40, 230), "purple": (130, 30, 160), "pink": (255, 150, 200), "brown": (120, 70, 20),
    "black": (5, 5, 5), "white": (250, 250, 250),
}


class ColourWordTokenizer:
    """Fake tokenizer: one token per text, the index of its colour word (or 10 for none)."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [next((i for i, c in enumerate(COLORS) if f" {c} " in f" {t.replace('-', ' ')} "), 10) for t in texts]
        return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


class NearestColourCLIP(torch.nn.Module):
    """Fake CLIP: text -> one-hot colour; image -> one-hot of the palette colour nearest the crop's median pixel."""

    def __init__(self):
        super().__init__()
        self.texts_seen: list[int] = []

    def get_text_features(self, input_ids, attention_mask=None):
        self.texts_seen.extend(input_ids[:, 0].tolist())
        return torch.nn.functional.one_hot(input_ids[:, 0], 11).float() + 0.1

    def get_image_features(self, pixel_values):
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        rgb = (pixel_values * std + mean).flatten(2).median(dim=2).values * 255
        palette = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32)
        nearest = torch.cdist(rgb, palette).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, 11).float()


def two_object_image():
    """A 64x64 dark-grey image with a blue square (left) and a yellow disc (right), their masks and boxes."""
    rgb = np.full((64, 64, 3), 90, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    m_blue = np.zeros((64, 64), bool)
    m_blue[20:44, 4:28] = True
    m_yellow = (yy - 32) ** 2 + (xx - 48) ** 2 <= 12**2
    rgb[m_blue], rgb[m_yellow] = PALETTE["blue"], PALETTE["yellow"]
    blue = Detection(box=(4.0, 20.0, 28.0, 44.0), score=0.9, mask=m_blue)
    yellow = Detection(box=(36.0, 20.0, 61.0, 45.0), score=0.8, mask=m_yellow)  # the disc's tight box
    assert masks_to_boxes(torch.from_numpy(m_yellow)[None]).tolist() == [list(yellow.box)]
    return rgb, blue, yellow


def test_clip_colour_classifier_uses_templates_masks_and_normalised_weights():
    model = NearestColourCLIP()
    clf = ClipColorClassifier(model, ColourWordTokenizer(), torch.device("cpu"))
    rgb, blue, yellow = two_object_image()
    assert clf(Image.fromarray(rgb), "car", [blue, yellow]) == ["blue", "yellow"]
    weights = clf.text_weights("car")
    assert weights.shape == (11, 10)
    assert torch.allclose(weights.norm(dim=0), torch.ones(10))
    assert len(model.texts_seen) == 3 * len(COLORS)  # 3 templates per colour, computed once per class
    clf(Image.fromarray(rgb), "car", [yellow])
    assert len(model.texts_seen) == 3 * len(COLORS)  # cached
    assert COLOR_TEMPLATES == ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


# ----------------------------------------------------------------------------------------------- rules path


def marked_images(n: int) -> torch.Tensor:
    """n plain 32x32 images whose red channel at (0, 0) is the image index, so detect_fn knows which it got."""
    images = torch.full((n, 3, 32, 32), 0.5)
    for i in range(n):
        images[i, 0, 0, 0] = i / 255
    return images


def box(x1, y1, x2, y2, score=0.95, color=None):
    return Detection(box=(float(x1), float(y1), float(x2), float(y2)), score=score, color=color)


# Official GenEval metadata records (evaluation_metadata.jsonl format) with hand-made detections and the
# official answer: (metadata, raw detections, colours returned by the colour classifier per class, correct).
CASES = [
    ({"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
     {"bench": [box(0, 0, 10, 10, 0.31)]}, {}, True),
    ({"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
     {"bench": [box(0, 0, 10, 10, 0.3)]}, {}, False),  # score must exceed 0.3
    ({"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
      "prompt": "a photo of a bench and a sports ball"},
     {"bench": [box(0, 0, 10, 10)], "sports ball": [box(12, 0, 20, 8, 0.5)]}, {}, True),
    ({"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
      "prompt": "a photo of a bench and a sports ball"},
     {"bench": [box(0, 0, 10, 10)], "cat": [box(12, 0, 20, 8)]}, {}, False),
    ({"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
      "prompt": "a photo of two clocks"},
     {"clock": [box(0, 0, 5, 5, 0.95), box(6, 0, 11, 5, 0.91), box(12, 0, 17, 5, 0.85)]}, {}, True),
    ({"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
      "prompt": "a photo of two clocks"},
     {"clock": [box(0, 0, 5, 5, 0.95), box(6, 0, 11, 5, 0.91), box(12, 0, 17, 5, 0.92)]}, {}, False),
    ({"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
      "prompt": "a photo of two clocks"},
     {"clock": [box(0, 0, 5, 5, 0.95), box(6, 0, 11, 5, 0.85)]}, {}, False),  # 0.9 threshold for counting
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
     {"car": [box(0, 0, 10, 10)]}, {"car": ["pink"]}, True),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
     {"car": [box(0, 0, 10, 10)]}, {"car": ["red"]}, False),
    ({"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                     {"class": "dog", "count": 1, "position": ["right of", 0]}],
      "prompt": "a photo of a dog right of a teddy bear"},
     {"teddy bear": [box(0, 10, 10, 20)], "dog": [box(20, 10, 30, 20)]}, {}, True),
    ({"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                     {"class": "dog", "count": 1, "position": ["right of", 0]}],
      "prompt": "a photo of a dog right of a teddy bear"},
     {"teddy bear": [box(20, 10, 30, 20)], "dog": [box(0, 10, 10, 20)]}, {}, False),
    ({"tag": "position", "include": [{"class": "kite", "count": 1},
                                     {"class": "wine glass", "count": 1, "position": ["above", 0]}],
      "prompt": "a photo of a wine glass above a kite"},
     {"kite": [box(0, 10, 10, 20)], "wine glass": [box(1, 8, 11, 18)]}, {}, False),  # offset within the margin
    ({"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                       {"class": "microwave", "count": 1, "color": "purple"}],
      "prompt": "a photo of a green bus and a purple microwave"},
     {"bus": [box(0, 0, 10, 10)], "microwave": [box(12, 0, 20, 8)]}, {"bus": ["green"], "microwave": ["purple"]},
     True),
    ({"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                       {"class": "microwave", "count": 1, "color": "purple"}],
      "prompt": "a photo of a green bus and a purple microwave"},
     {"bus": [box(0, 0, 10, 10)], "microwave": [box(12, 0, 20, 8)]}, {"bus": ["purple"], "microwave": ["green"]},
     False),
]


def test_full_detection_to_rule_path_gives_the_official_answers():
    calls = []

    def detect(rgb):
        assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
        return CASES[int(rgb[0, 0, 0])][1]

    def colours(image, classname, detections):
        index = int(np.asarray(image)[0, 0, 0])
        calls.append((index, classname, len(detections)))
        return CASES[index][2][classname][: len(detections)]

    scorer = GenEvalScorer(detect_fn=detect, color_fn=colours, device="cpu")
    metas = [c[0] for c in CASES]
    batch = scorer.score(marked_images(len(CASES)), [m["prompt"] for m in metas], metas)
    assert batch.details["correct"] == [c[3] for c in CASES]
    assert batch.scores.tolist() == [1.0 if c[3] else 0.0 for c in CASES]
    assert batch.details["tag"] == [m["tag"] for m in metas]
    assert all((r == "") == ok for r, ok in zip(batch.details["reason"], batch.details["correct"]))
    assert "expected pink car>=1, found 0 pink" in batch.details["reason"][8]
    # the colour classifier sees only colour clauses, with the top-count detections of the class
    assert sorted(calls) == [(7, "car", 1), (8, "car", 1), (12, "bus", 1), (12, "microwave", 1),
                             (13, "bus", 1), (13, "microwave", 1)]


def test_masks_through_colour_classifier_and_rules():
    """Hand-made masks + boxes -> grey composite crops -> (fake, nearest-colour) CLIP -> colour and position rules."""
    rgb, blue, yellow = two_object_image()
    scorer = GenEvalScorer(
        detect_fn=lambda image: {"car": [blue], "bus": [yellow]},
        color_factory=lambda: (NearestColourCLIP(), ColourWordTokenizer()), device="cpu",
    )
    metas = [
        {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "blue"},
                                          {"class": "bus", "count": 1, "color": "yellow"}],
         "prompt": "a photo of a blue car and a yellow bus"},
        {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "yellow"},
                                          {"class": "bus", "count": 1, "color": "blue"}],
         "prompt": "a photo of a yellow car and a blue bus"},
        {"tag": "position", "include": [{"class": "car", "count": 1},
                                        {"class": "bus", "count": 1, "position": ["right of", 0]}],
         "prompt": "a photo of a bus right of a car"},
        {"tag": "position", "include": [{"class": "car", "count": 1},
                                        {"class": "bus", "count": 1, "position": ["above", 0]}],
         "prompt": "a photo of a bus above a car"},
    ]
    images = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).expand(4, -1, -1, -1)
    batch = scorer.score(images, [m["prompt"] for m in metas], metas)
    assert batch.details["correct"] == [True, False, True, False]
    assert "expected yellow car>=1, found 0 yellow; and 1 blue" in batch.details["reason"][1]
    assert batch.details["reason"][3] == "expected bus above target, found right of target"


def test_jpeg_option_feeds_the_decoded_jpeg():
    seen = []
    scorer = GenEvalScorer(detect_fn=lambda rgb: seen.append(rgb) or {}, color_fn=lambda *a: [], jpeg_quality=75,
                           device="cpu")
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    meta = CASES[0][0]
    batch = scorer.score(images, [meta["prompt"]], [meta])
    png = to_uint8_hwc(images)[0]
    assert np.array_equal(seen[0], jpeg_roundtrip(png, 75)) and not np.array_equal(seen[0], png)
    assert batch.scores.tolist() == [0.0] and "jpeg75" in scorer.version


def test_constructor_and_score_validation():
    with pytest.raises(ValueError, match="detector must be"):
        GenEvalScorer(detector="yolo", detect_fn=lambda rgb: {}, color_fn=lambda *a: [])
    with pytest.raises(ValueError, match="jpeg_quality"):
        GenEvalScorer(detect_fn=lambda rgb: {}, color_fn=lambda *a: [], jpeg_quality=0)
    scorer = GenEvalScorer(detect_fn=lambda rgb: {}, color_fn=lambda *a: [], device="cpu")
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        scorer.score(torch.rand(2, 3, 8, 8), ["a"], [CASES[0][0]])
    with pytest.raises(ValueError, match="'tag'"):
        scorer.score(torch.rand(1, 3, 8, 8), ["a"], [{"include": []}])


def test_offline_error_names_the_official_model_ids(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=DEFAULT_DETECTOR_ID) as err:
        GenEvalScorer(color_fn=lambda *a: [], device="cpu")
    assert "model_id=" in str(err.value)
    with pytest.raises(OSError, match=DEFAULT_COLOR_ID) as err:
        GenEvalScorer(detect_fn=lambda rgb: {}, device="cpu")
    assert "color_model_id=" in str(err.value)


# ----------------------------------------------------------------------------------------------- tiny models


def tiny_clip():
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer


def tiny_mask2former():
    """A tiny random Mask2Former with 80 labels whose class head is biased to "cat" (so detections exist)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(image_size=224, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=80, num_queries=12, hidden_dim=32, feature_size=32,
        mask_feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
        encoder_feedforward_dim=32, use_pretrained_backbone=False, id2label=dict(enumerate(MMDET_NAMES)),
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.bias[OBJECT_NAMES.index("cat")] += 20.0
    return model


@pytest.fixture(scope="module")
def tiny_scorer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save on a busy CPU
    yield build_scorer("geneval", detector_factory=tiny_mask2former, color_factory=tiny_clip, device="cpu",
                       detector_scale=(96, 64))
    torch.set_num_threads(threads)


TINY_METAS = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "blue"},
                                      {"class": "cat", "count": 2, "color": "white"}],
     "prompt": "a photo of a blue cat and a white cat"},
]


def test_tiny_models_end_to_end(tiny_scorer):
    assert isinstance(tiny_scorer, Scorer) and tiny_scorer.name == "geneval"
    assert tiny_scorer.version.startswith("geneval-1;detector=hf:factory;color=factory")
    torch.manual_seed(1)
    images = torch.rand(4, 3, 40, 48)
    prompts = [m["prompt"] for m in TINY_METAS]
    batch = tiny_scorer.score(images, prompts, TINY_METAS)
    assert batch.scores.shape == (4,) and batch.scores.dtype == np.float64
    assert set(batch.scores.tolist()) <= {0.0, 1.0}
    assert batch.details["correct"][:2] == [True, False]  # the head predicts cats, never dogs
    assert batch.details["reason"][1] == "expected dog>=1, found 0"
    for reason, ok in zip(batch.details["reason"][2:], batch.details["correct"][2:]):
        assert ok or any(c in reason for c in COLORS)  # a colour verdict, right or wrong
    # deterministic, and a batch equals its images scored one by one
    again = tiny_scorer.score(images, prompts, TINY_METAS)
    assert again.rows() == batch.rows()
    singles = [tiny_scorer.score(images[i : i + 1], prompts[i : i + 1], TINY_METAS[i : i + 1]).rows()[0]
               for i in range(4)]
    assert singles == batch.rows()


def test_tiny_detector_detections_are_consistent(tiny_scorer):
    torch.manual_seed(2)
    rgb = to_uint8_hwc(torch.rand(1, 3, 40, 48))[0]
    raw = tiny_scorer._detect(rgb)
    assert set(raw) == {"cat"}
    for det in raw["cat"]:
        assert det.mask.shape == (40, 48) and det.mask.any()
        assert 0.3 < det.score <= 1.0
        ys, xs = np.nonzero(det.mask)
        assert det.box == (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
