"""OCRScorer: result parsing of RapidOCR and both PaddleOCR APIs on recorded output structures, channel order,
and a real offline read-back of rendered text with rapidocr-onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer, to_uint8_hwc
from flowopd.scorers.ocr import OCRScorer, parse_paddleocr, parse_paddleocr2, parse_paddleocr3, parse_rapidocr
from flowopd.scorers.ocr_rules import ocr_accuracy

BOX = [[10.0, 20.0], [200.0, 20.0], [200.0, 60.0], [10.0, 60.0]]

# Recorded shapes of each engine's output for one image.
RAPID = ([[BOX, "FLOW", 0.99], [BOX, "0PD", 0.93]], [0.1, 0.0, 0.05])
PADDLE2 = [[[BOX, ("FLOW", 0.99)], [BOX, ("0PD", 0.93)], [BOX, ("junk", 0.0)]]]
PADDLE2_EMPTY = [None]
PADDLE3 = [{"input_path": None, "rec_texts": ["FLOW", "0PD"], "rec_scores": [0.99, 0.93], "rec_polys": [BOX, BOX]}]
PADDLE3_JSON = [{"res": {"rec_texts": ["FLOW"], "rec_scores": [0.99]}}]


def test_parsers_on_recorded_structures():
    assert parse_rapidocr(RAPID) == [("FLOW", 0.99), ("0PD", 0.93)]
    assert parse_rapidocr((None, None)) == []
    assert parse_paddleocr2(PADDLE2) == [("FLOW", 0.99), ("0PD", 0.93), ("junk", 0.0)]
    assert parse_paddleocr2(PADDLE2_EMPTY) == [] and parse_paddleocr2([]) == []
    assert parse_paddleocr3(PADDLE3) == [("FLOW", 0.99), ("0PD", 0.93)]
    assert parse_paddleocr3(PADDLE3_JSON) == [("FLOW", 0.99)]
    assert parse_paddleocr3([{"rec_texts": [], "rec_scores": []}]) == []
    assert parse_paddleocr(PADDLE2) == parse_paddleocr2(PADDLE2)
    assert parse_paddleocr(PADDLE3) == parse_paddleocr3(PADDLE3)
    assert parse_paddleocr(PADDLE2_EMPTY) == []
    with pytest.raises(ValueError, match="2 rec_texts but 1 rec_scores"):
        parse_paddleocr3([{"rec_texts": ["a", "b"], "rec_scores": [0.5]}])


class FakePaddle2:
    """PaddleOCR 2.x: ``ocr(img, cls=...)`` returns the recorded list; remembers what it was given."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def ocr(self, img, cls=True):
        self.calls.append((img.copy(), cls))
        return self.result


class FakePaddle3:
    """PaddleOCR 3.x: ``predict(img)`` returns OCRResult mappings (its ``ocr`` is a deprecated alias)."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def predict(self, img):
        self.calls.append(img.copy())
        return self.result

    def ocr(self, img, cls=None):  # pragma: no cover - must not be used when predict exists
        raise AssertionError("the 3.x API must be called through predict")


class FakeRapid:
    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, img, use_cls=True):
        self.calls.append((img.copy(), use_cls))
        return self.result


PROMPT = 'a neon sign that says "FLOW OPD" at night'


def coloured_image():
    torch.manual_seed(0)
    return torch.rand(1, 3, 16, 24)


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_paddle2_glue_channel_order_and_rule(order):
    fake = FakePaddle2(PADDLE2)
    scorer = OCRScorer(engine="paddleocr", engine_factory=lambda: fake, channel_order=order)
    images = coloured_image()
    batch = scorer.score(images, [PROMPT], [{}])
    (array, cls), = fake.calls
    rgb = to_uint8_hwc(images)[0]
    assert cls is False  # no angle classifier, as Flow-GRPO
    assert np.array_equal(array, rgb if order == "rgb" else rgb[:, :, ::-1])
    # "FLOW" + "0PD" (the zero-confidence piece is dropped): "flow0pd" vs "flowopd", one substitution
    assert batch.scores.tolist() == pytest.approx([1 - 1 / 7])
    assert batch.details == {"text": ["FLOW0PD"], "target": ["FLOW OPD"]}
    assert f"input={order}" in scorer.version and "engine=paddleocr" in scorer.version


def test_paddle3_and_rapid_glue():
    fake3 = FakePaddle3(PADDLE3)
    batch = OCRScorer(engine="paddleocr", engine_factory=lambda: fake3).score(coloured_image(), [PROMPT], [{}])
    assert len(fake3.calls) == 1 and batch.details["text"] == ["FLOW0PD"]
    assert batch.scores.tolist() == pytest.approx([1 - 1 / 7])
    rapid = FakeRapid(RAPID)
    batch = OCRScorer(engine="rapidocr", engine_factory=lambda: rapid).score(coloured_image(), [PROMPT], [{}])
    assert rapid.calls[0][1] is False and batch.details["text"] == ["FLOW0PD"]
    empty = OCRScorer(engine="rapidocr", engine_factory=lambda: FakeRapid((None, None)))
    assert empty.score(coloured_image(), [PROMPT], [{}]).rows() == [{"score": 0.0, "text": "", "target": "FLOW OPD"}]


def test_validation():
    with pytest.raises(ValueError, match="engine must be one of"):
        OCRScorer(engine="tesseract", engine_factory=object)
    with pytest.raises(ValueError, match="channel_order"):
        OCRScorer(engine_factory=object, channel_order="rbg")
    scorer = OCRScorer(engine_factory=lambda: FakeRapid(RAPID))
    with pytest.raises(ValueError, match="no text between a pair of double quotes"):
        scorer.score(coloured_image(), ["no quotes here"], [{}])
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        scorer.score(coloured_image(), [PROMPT, PROMPT], [{}, {}])


def test_paddleocr_engine_without_paddle_says_how_to_install():
    try:
        import paddleocr  # noqa: F401

        pytest.skip("paddleocr is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="paddleocr"):
        OCRScorer(engine="paddleocr")


# ----------------------------------------------------------------------------------------------- real engine


def render(text: str, size: int = 512) -> torch.Tensor:
    """Black ``text`` centred on white, DejaVu Sans 64 px (matplotlib ships the font), as a (3, H, W) tensor."""
    font_manager = pytest.importorskip("matplotlib.font_manager")
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), 64)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def rapid_scorer():
    pytest.importorskip("rapidocr_onnxruntime")
    return build_scorer("ocr", engine="rapidocr")


def test_rapidocr_reads_rendered_text_offline(rapid_scorer):
    assert isinstance(rapid_scorer, Scorer) and rapid_scorer.name == "ocr"
    assert "rapidocr-onnxruntime" in rapid_scorer.version
    images = torch.stack([render("FLOW OPD"), render("FLOW OPB")])
    batch = rapid_scorer.score(images, [PROMPT, PROMPT], [{}, {}])
    assert batch.details["text"][0].replace(" ", "") == "FLOWOPD"
    assert batch.scores[0] == 1.0
    # the misspelt rendering scores what the rule says for what was read (1 - 1/7 when read as written)
    assert batch.scores[1] == pytest.approx(ocr_accuracy(PROMPT, batch.details["text"][1]))
    assert batch.scores[1] == pytest.approx(1 - 1 / 7)
