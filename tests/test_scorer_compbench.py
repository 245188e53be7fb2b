"""T2I-CompBench: the official rules on hand-made detections and depth maps, prompt parsing on the real val
files, and every category end to end on tiny random models (no download)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowopd.scorers import build_scorer
from flowopd.scorers import compbench_rules as R
from flowopd.scorers.base import ScoreBatch
from flowopd.scorers.compbench import CATEGORIES, CompBenchScorer, DepthEstimator
from flowopd.scorers.compbench_rules import Detection

DATA = Path(os.environ.get("FLOWOPD_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


def val_prompts(category: str, version: str = "t2i_compbench") -> list[str]:
    path = DATA / version / f"{category}_val.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ rules: geometry


def test_rule_frame_is_torchvision_resize_479_max_480():
    assert R.rule_frame_size(512, 512) == (479, 479)
    assert R.rule_frame_size(1024, 1024) == (479, 479)
    # 512 wide x 768 high: 479 x 718 exceeds 480 -> short side int(480 * 479 / 718) = 320
    assert R.rule_frame_size(768, 512) == (480, 320)
    assert R.rule_frame_size(512, 768) == (320, 480)


@pytest.mark.parametrize(
    "locality, box1, box2, expected",
    [
        ("on the left of", (0, 0, 100, 100), (300, 0, 400, 100), 1.0),  # centre offset +300 in x, no overlap
        ("on the left of", (300, 0, 400, 100), (0, 0, 100, 100), 0.0),  # wrong side
        ("on the right of", (300, 0, 400, 100), (0, 0, 100, 100), 1.0),
        ("on the left of", (0, 0, 100, 100), (50, 0, 150, 100), 0.1 / (1 / 3)),  # IoU 1/3 >= 0.1
        ("on the left of", (0, 0, 100, 100), (100, 0, 120, 500), 0.0),  # |dy| > |dx|: not a left relation
        ("on the top of", (0, 0, 100, 100), (0, 300, 100, 400), 1.0),  # image y grows downwards
        ("on the bottom of", (0, 0, 100, 100), (0, 300, 100, 400), 0.0),
        ("on the bottom of", (0, 300, 100, 400), (0, 0, 100, 100), 1.0),
        ("next to", (0, 0, 10, 10), (100, 400, 110, 410), 1.0),  # |dx| = 100 < 150
        ("near", (0, 0, 10, 10), (300, 600, 310, 610), 150 / 600),
        ("on top of", (0, 0, 100, 100), (0, 300, 100, 400), 0.0),  # official: no branch for "on top of"
        (None, (0, 0, 100, 100), (300, 0, 400, 100), 0.0),
    ],
)
def test_determine_position_2d(locality, box1, box2, expected):
    assert R.determine_position(locality, box1, box2) == pytest.approx(expected)


def test_spatial_score_2d_exact_labels_first_detection_and_cutoff():
    dog = Detection("dog", 0.9, (0, 0, 100, 100))
    cat = Detection("cat", 0.8, (300, 0, 400, 100))
    weak_cat = Detection("cat", 0.6, (0, 300, 100, 400))
    # 0.25 * 0.9 + 0.25 * 0.8 + 1 / 2
    assert R.spatial_score_2d("dog", "cat", "on the left of", [dog, cat, weak_cat]) == pytest.approx(0.925)
    # the first (most confident) "cat" is used, not the one below the dog
    assert R.spatial_score_2d("dog", "cat", "on the top of", [dog, cat, weak_cat]) == 0.0
    # wrong side: 0.425 < 0.5 -> 0; one object only: 0.225 -> 0
    assert R.spatial_score_2d("dog", "cat", "on the right of", [dog, cat]) == 0.0
    assert R.spatial_score_2d("dog", "cat", "on the left of", [dog]) == 0.0
    # girl -> person; UniDet's "mouse2, mouse" never equals "mouse" in the 2-D rule
    person = Detection("person", 1.0, (0, 0, 100, 100))
    assert R.spatial_score_2d("girl", "cat", "on the left of", [person, cat]) == pytest.approx(0.95)
    mouse = Detection("mouse2, mouse", 1.0, (300, 0, 400, 100))
    assert R.spatial_score_2d("dog", "mouse", "on the left of", [dog, mouse]) == 0.0


def test_determine_position_3d_uses_transposed_depth_slices():
    # rows are indexed by x (official quirk): the rows 0-9 are near (1.0), the rows 20-29 far (0.25)
    depth = np.zeros((40, 40), dtype=np.float32)
    depth[0:10, :] = 1.0
    depth[20:30, :] = 0.25
    assert R.determine_position("in front of", (0, 30, 10, 40), (20, 30, 30, 40), depth=depth) == 0.0  # IoU 0
    over1, over2 = (0, 0, 10, 10), (5, 0, 15, 10)  # IoU = 50 / 150 = 1/3
    # mean depth[0:10, 0:10] = 1.0 > mean depth[5:15, 0:10] = 0.5 -> in front, partial overlap: (1/3) / 0.5
    assert R.determine_position("in front of", over1, over2, depth=depth) == pytest.approx(2 / 3)
    assert R.determine_position("behind", over1, over2, depth=depth) == 0.0
    assert R.determine_position("hidden", over2, over1, depth=depth) == pytest.approx(2 / 3)
    big1, big2 = (20, 0, 30, 10), (21, 0, 30, 10)  # IoU 0.9 > 0.5
    assert R.determine_position("in front of", big1, big2, depth=depth) == 0.0  # equal means: not ordered
    depth[20, :] = 1.0  # only box 1 covers x = 20: its mean rises to 0.325 -> in front, IoU > 0.5 -> 1
    assert R.determine_position("in front of", big1, big2, depth=depth) == 1.0
    # on the transposed map both slices are rows 0-9 (all 1.0): the slices really are [x, y]
    assert R.determine_position("in front of", big1, big2, depth=np.ascontiguousarray(depth.T)) == 0.0
    with pytest.raises(ValueError, match="depth map"):
        R.determine_position("behind", over1, over2)


def test_spatial_score_3d_substring_labels_loop_quirk_and_no_cutoff():
    depth = np.full((100, 100), 0.5, dtype=np.float32)
    cow = Detection("cattle, cow", 0.8, (0, 0, 50, 50))
    dog = Detection("dog", 0.6, (100, 100, 120, 120))
    # substring match: "cow" in "cattle, cow"; no overlap -> position 0; no 0.5 cut-off in 3-D
    assert R.spatial_score_3d("cow", "dog", "behind", [cow, dog], depth) == pytest.approx(
        0.25 * 0.8 + 0.25 * 0.6
    )
    assert R.spatial_score_3d("cow", "bird", "behind", [cow, dog], depth) == pytest.approx(0.2)
    assert R.spatial_score_3d("bird", "dog", "behind", [cow, dog], depth) == pytest.approx(0.15)
    # official loop: index of object 1 keeps moving until object 2 is found
    cow2 = Detection("cow", 0.4, (0, 0, 50, 50))
    assert R.spatial_score_3d("cow", "dog", "behind", [cow, cow2, dog], depth) == pytest.approx(
        0.25 * 0.4 + 0.15
    )
    depth2 = np.zeros((100, 100), dtype=np.float32)
    near = Detection("cat", 1.0, (0, 0, 40, 40))
    far = Detection("dog", 1.0, (0, 0, 40, 30))  # IoU 0.75
    depth2[0:40, 30:40] = 1.0  # inside box "near" only (rows = x, columns = y in [30, 40))
    assert R.spatial_score_3d("cat", "dog", "in front of", [near, far], depth2) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ rules: numeracy


def test_numeracy_targets_hand_checked():
    tokens = R.fallback_tokens("three couches, two keys, two women, four rabbits and one bowl")
    assert R.numeracy_targets(tokens) == (["couch", "key", "woman", "rabbit", "bowl"], [3, 2, 2, 4, 1])
    assert R.numeracy_targets(R.fallback_tokens("seven shrimp")) == (["shrimp"], [7])
    assert R.numeracy_targets(R.fallback_tokens("a mouse and two mice")) == (["mouse", "mouse"], [1, 2])
    # "a" before a plural: object kept, count unreadable (w2n fails) -> lists of unequal length, as official
    assert R.numeracy_targets(R.fallback_tokens("a dogs")) == (["dog"], [])
    # a singular after a number > 1 crashes the official script; skipped here
    assert R.numeracy_targets(R.fallback_tokens("two dog")) == ([], [])


def test_numeracy_score_dedup_rename_and_counts():
    dogs = [Detection("dog", 0.9, (0, 0, 100, 100)), Detection("dog", 0.8, (200, 0, 300, 100))]
    inside = Detection("dog", 0.7, (10, 10, 90, 90))  # > 90 % inside the first dog: merged
    assert R.numeracy_score(["dog"], [2], dogs + [inside]) == 1.0
    assert R.numeracy_score(["dog"], [3], dogs) == 0.5  # present, wrong count
    assert R.numeracy_score(["dog", "cat"], [2, 1], dogs) == 0.5  # dog 0.5 + 0.5, cat 0
    mice = [Detection("mouse2, mouse", 0.9, (0, 0, 50, 50)), Detection("mouse1", 0.9, (100, 0, 150, 50))]
    assert R.numeracy_score(["mouse"], [2], mice) == 1.0  # labels containing "mouse" are renamed
    people = [Detection("person", 0.9, (0, 0, 50, 50))]
    assert R.numeracy_score(["woman"], [1], people) == 1.0
    assert R.numeracy_score(["dog"], [], dogs) == 0.5  # no readable count: presence only
    assert math.isnan(R.numeracy_score([], [], dogs))
    assert R.same_instance((0, 0, 99, 99), (0, 0, 99, 99))
    assert not R.same_instance((0, 0, 99, 99), (50, 0, 149, 99))


def test_nms_per_label_keeps_the_best_box_per_object_and_sorts():
    a = Detection("dog", 0.5, (0, 0, 100, 100))
    b = Detection("dog", 0.9, (5, 5, 100, 100))  # IoU 0.9 with a
    c = Detection("cat", 0.7, (5, 5, 100, 100))  # other label: kept
    d = Detection("dog", 0.6, (300, 300, 400, 400))
    assert R.nms_per_label([a, b, c, d]) == [b, c, d]


# ----------------------------------------------------------------------------------------------- rules: text


def test_blip_question_rules():
    assert R.pre_question('A "Big" dog. (really)?') == "a big dog really?"
    assert R.blip_questions(["a green bench", "the left", "top", "a blue bowl"]) == [
        "a green bench?",
        "a blue bowl?",
    ]
    assert len(R.blip_questions([f"thing {i}" for i in range(12)])) == 8  # --np_num 8
    # each answer rounded to 4 decimals, the product too: 0.9877 * 0.3 = 0.29631 -> 0.2963
    assert R.blip_score([0.98765, 0.3]) == 0.2963
    assert R.blip_score([]) == 1.0  # no noun phrase: every question counts as 1


def test_complex_kind_and_three_in_one():
    assert R.complex_kind("The cat sat. Then it slept", ["the cat sat."], []) == "spatial"
    assert R.complex_kind("A dog", [], ["a dog"]) == "action"
    assert R.complex_kind("A dog", [], []) == "spatial_action"
    assert R.three_in_one("spatial", 0.4, 0.8, None) == pytest.approx(0.6)
    assert R.three_in_one("action", 0.4, None, 0.2) == pytest.approx(0.3)
    assert R.three_in_one("spatial_action", 0.3, 0.6, 0.9) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="complex kind"):
        R.three_in_one("other", 0.1, 0.1, 0.1)


def test_unidet_label_space_queries():
    assert "mouse2, mouse" in R.unidet_labels_for("mouse") and "mouse" not in R.unidet_labels_for("mouse")
    assert "cattle, cow" in R.unidet_labels_for("cow")
    assert R.unidet_labels_for("wallet") == []  # the official rules can never find a wallet
    assert R.label_query_texts("table, desk") == ["table", "desk"]
    assert R.label_query_texts("duck (bird)") == ["duck"]
    assert R.label_query_texts("mouse2, mouse") == ["mouse", "mouse"]
    assert len(R.UNIDET_LABELS) == 677 and R.UNIDET_LABELS[:3] == ("bottle", "cup", "dining table")


# ------------------------------------------------------------------------------------------ the val files


def test_questions_on_real_attribute_prompts_hand_checked():
    parser = R.PromptParser("fallback")
    color, shape, texture = val_prompts("color"), val_prompts("shape"), val_prompts("texture")
    assert color[0] == "a green bench and a blue bowl"
    assert R.blip_questions(parser.noun_phrases(color[0])) == ["a green bench?", "a blue bowl?"]
    cases = {
        "A black and white cat sits in a white sink.": ["a black and white cat?", "a white sink?"],
        "A bathroom with white tile and a beige toilet.": ["a bathroom?", "white tile?", "a beige toilet?"],
        "a cubic block and a cylindrical container of hand cream": [
            "a cubic block?",
            "a cylindrical container?",
            "hand cream?",
        ],
        "a plastic container and a fluffy teddy bear": ["a plastic container?", "a fluffy teddy bear?"],
        "a red orange and a brown sheep": ["a red orange?", "a brown sheep?"],
        "a circular dining table and a triangular table runner": [
            "a circular dining table?",
            "a triangular table runner?",
        ],
    }
    pool = set(color) | set(shape) | set(texture) | set(val_prompts("color", "flowopd_t2i_compbench"))
    for prompt, expected in cases.items():
        assert prompt in pool, prompt
        assert R.blip_questions(parser.noun_phrases(prompt)) == expected, prompt


@pytest.mark.parametrize("category", ["color", "shape", "texture"])
def test_fallback_splits_every_simple_two_phrase_prompt(category):
    """On "<phrase> and <phrase>" prompts (no preposition) the fallback asks exactly the two phrases."""
    parser = R.PromptParser("fallback")
    simple = [
        p
        for p in val_prompts(category)
        if re.fullmatch(r"[a-z ]+ and [a-z ]+\.?", p)
        and not re.search(r" (of|with|on)( |$)|ing |and .* and", p)
    ]
    assert len(simple) > 200
    wrong = []
    for p in simple:
        left, right = p.rstrip(".").split(" and ")
        if R.blip_questions(parser.noun_phrases(p)) != [f"{left}?", f"{right}?"]:
            wrong.append(p)
    assert wrong == (
        ["a small block and a cylindrical soda can"] if category == "shape" else []
    )  # "can": AUX


def test_color_val_versions_differ_in_five_lines():
    official, release = val_prompts("color"), val_prompts("color", "flowopd_t2i_compbench")
    assert len(official) == len(release) == 300
    changed = [i + 1 for i, (a, b) in enumerate(zip(official, release)) if a != b]
    assert changed == [228, 229, 272, 288, 300]
    assert release[271] == "A black and white cat sits in a white sink."
    for category in ("shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex"):
        assert val_prompts(category) == val_prompts(category, "flowopd_t2i_compbench"), category


@pytest.mark.parametrize(
    "category, vocabulary", [("spatial", R.SPATIAL_2D_WORDS), ("3d_spatial", R.SPATIAL_3D_WORDS)]
)
def test_spatial_objects_on_every_val_prompt(category, vocabulary):
    """Every val prompt is "a X <relation> a Y": the fallback gives X and Y (spaCy's first / last NOUN)."""
    parser = R.PromptParser("fallback")
    for prompt in val_prompts(category):
        words = re.findall(r"[a-z]+", prompt)
        assert parser.spatial_objects(prompt, vocabulary) == (words[1], words[-1]), prompt
        assert R.first_locality(prompt, vocabulary) is not None, prompt
    assert parser.spatial_objects("a giraffe next to a lamp", vocabulary) == (
        ("giraffe", "lamp") if category == "spatial" else (None, None)
    )


def test_numeracy_targets_on_every_val_prompt():
    """Every val prompt yields aligned (object, count) pairs, one per "<number> <object>" of the prompt."""
    numbers = {
        "a": 1,
        "an": 1,
        "one": 1,
        "two": 2,
        "three": 3,
        "four": 4,
        "five": 5,
        "six": 6,
        "seven": 7,
        "eight": 8,
    }
    for prompt in val_prompts("numeracy"):
        objects, counts = R.numeracy_targets(R.fallback_tokens(prompt))
        words = re.findall(r"[a-z]+", prompt)
        expected = [
            numbers[w]
            for w, nxt in zip(words, words[1:])
            if w in numbers and (nxt in R.OBJECTS_PLURAL or nxt in R.OBJECTS_SINGULAR)
        ]
        assert objects and len(objects) == len(counts), prompt
        assert counts == expected, prompt
        assert all(o in R.OBJECTS_SINGULAR for o in objects), prompt


def test_complex_kinds_of_the_official_lists():
    spatial = (DATA / "t2i_compbench/complex_val_spatial.txt").read_text().splitlines()
    action = (DATA / "t2i_compbench/complex_val_action.txt").read_text().splitlines()
    kinds = [R.complex_kind(p, spatial, action) for p in val_prompts("complex")]
    assert (kinds.count("spatial"), kinds.count("action"), kinds.count("spatial_action")) == (58, 212, 30)
    tokens = R.fallback_tokens("The red hat was on top of the brown coat rack.")
    assert R.complex_spatial_objects(tokens) == ("hat", "coat")  # spaCy: first NOUN after "on top of"
    assert (
        R.first_locality("The red hat was on top of the brown coat rack.", R.SPATIAL_2D_WORDS) == "on top of"
    )


class _FakeToken:
    def __init__(self, text: str, ws: str, pos: str) -> None:
        self.text, self.whitespace_, self.pos_ = text, ws, pos


class _FakeDoc(list):
    noun_chunks: list


def _fake_nlp(prompt: str) -> _FakeDoc:
    """spaCy's en_core_web_sm analysis of one prompt, written out by hand."""
    assert prompt == "a green bench on the left of a dog"
    doc = _FakeDoc(
        _FakeToken(t, " ", p)
        for t, p in zip(prompt.split(), ["DET", "ADJ", "NOUN", "ADP", "DET", "NOUN", "ADP", "DET", "NOUN"])
    )
    doc[-1].whitespace_ = ""
    chunk = type("Span", (), {})
    doc.noun_chunks = []
    for text in ("a green bench", "the left", "a dog"):
        span = chunk()
        span.text = text
        doc.noun_chunks.append(span)
    return doc


def test_prompt_parser_reads_a_spacy_doc():
    parser = R.PromptParser(_fake_nlp)
    prompt = "a green bench on the left of a dog"
    assert parser.uses_spacy and parser.name.startswith("spacy")
    assert R.blip_questions(parser.noun_phrases(prompt)) == ["a green bench?", "a dog?"]  # "the left" dropped
    assert parser.spatial_objects(prompt, R.SPATIAL_2D_WORDS) == ("bench", "dog")  # first / last NOUN
    assert R.without_adjectives(parser.tokens(prompt)) == "a bench on the left of a dog"


def test_prompt_parser_requires_spacy_when_asked():
    with pytest.raises(OSError, match="nlp='fallback'"):
        R.PromptParser("spacy", spacy_model="no_such_spacy_model_xyz")
    with pytest.raises(ValueError, match="nlp must be"):
        R.PromptParser("nltk")


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by thread start-up on a shared 2-core machine: run them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Factories of tiny random BLIP-VQA, OWLv2, DPT and CLIP models with offline tokenizers."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        CLIPConfig,
        CLIPModel,
        CLIPTokenizer,
        DPTConfig,
        DPTForDepthEstimation,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2Processor,
    )
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    d = tmp_path_factory.mktemp("tok")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "yes",
        "no",
        "a",
        "an",
        "the",
        "red",
        "green",
        "blue",
        "car",
        "dog",
        "cat",
        "bench",
        "?",
        ",",
        "and",
        "of",
        "[DEC]",
        "[ENC]",
    ]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)  # non-zero: OWLv2 masks queries whose first id is 0
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=77,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=16,
    )

    def clip_tokenizer():
        return CLIPTokenizer(
            str(d / "vocab.json"), str(d / "merges.txt")
        )  # positional: v5 ignores the keywords

    def blip():
        torch.manual_seed(0)
        cfg = BlipConfig(
            text_config=dict(
                vocab_size=len(words),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=37,
                encoder_hidden_size=32,
                bos_token_id=words.index("[DEC]"),
                pad_token_id=0,
                sep_token_id=3,
                max_position_embeddings=64,
            ),
            vision_config=vision,
        )
        return BlipForQuestionAnswering(cfg).eval(), BertTokenizer(str(d / "vocab.txt"))

    def clip():
        torch.manual_seed(1)
        return CLIPModel(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        ).eval(), clip_tokenizer()

    def owl():
        torch.manual_seed(2)
        cfg = Owlv2Config(
            text_config={**text, "max_position_embeddings": 16}, vision_config=vision, projection_dim=32
        )
        processor = Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), clip_tokenizer())
        return Owlv2ForObjectDetection(cfg).eval(), processor

    def dpt():
        torch.manual_seed(3)
        cfg = DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=32,
            patch_size=32,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 8, 16, 16],
            fusion_hidden_size=16,
        )
        return DPTForDepthEstimation(cfg).eval()

    cache = {}

    def once(key, make):
        def factory():
            if key not in cache:
                cache[key] = make()
            return cache[key]

        return factory

    return {
        "blip_factory": once("blip", blip),
        "clip_factory": once("clip", clip),
        "detector_factory": once("owl", owl),
        "depth_factory": once("dpt", dpt),
        "device": "cpu",
        "detection_threshold": 0.0,
        "blip_image_size": 64,
        "depth_input_size": 64,
        "nlp": "fallback",
    }


PROMPTS = {
    "color": ["a green bench and a blue bowl", "a red car", "a red car"],
    "shape": ["a big dog and a small cat", "an oval sink and a rectangular mirror.", "a cat"],
    "texture": ["a plastic toy and a glass bottle", "a wooden door", "fluffy clouds and a glass table"],
    "spatial": ["a dog on the left of a cat", "a girl on the top of a frog", "a mouse near a bag"],
    "3d_spatial": ["a dog in front of a desk", "a chair hidden by a mouse", "a cat behind a boy"],
    "numeracy": ["two dogs", "three cats and one bowl", "one turtle"],
    "non_spatial": ["a man is riding a horse", "a cat", "a dog"],
    "complex": [
        "The red hat was on top of the brown coat rack.",  # spatial
        "The fluffy white cat slept on the warm fuzzy blanket.",  # action
        "The smooth black river flowed next to the tall green trees.",  # spatial + action
    ],
}


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 48, 40, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_end_to_end(tiny, category):
    prompts = PROMPTS[category]
    images = _images(len(prompts))
    meta = [{"category": category} for _ in prompts]
    scorer = build_scorer("compbench", category=category, batch_size=8, **tiny)
    batch = scorer.score(images, prompts, meta)
    assert isinstance(batch, ScoreBatch) and batch.scores.shape == (3,) and batch.scores.dtype == np.float64
    assert batch.details["category"] == [category] * 3
    assert np.isfinite(batch.scores).all()
    if category != "non_spatial":  # cosine may be negative
        assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
    assert (
        scorer.version.startswith(f"t2i-compbench@1b70949/{category}/") and "nlp=fallback" in scorer.version
    )
    assert np.array_equal(scorer.score(images, prompts, meta).scores, batch.scores)  # deterministic
    one_by_one = CompBenchScorer(category, batch_size=1, **tiny)
    singles = ScoreBatch.concat(
        [one_by_one.score(images[i : i + 1], prompts[i : i + 1], meta[i : i + 1]) for i in range(3)]
    )
    # BLIP pads questions per batch; its 4-decimal rounding can move a value by one unit
    np.testing.assert_allclose(singles.scores, batch.scores, atol=2e-4, rtol=0)
    assert singles.details == batch.details or category == "complex"
    if category == "complex":
        assert batch.details["complex_kind"] == ["spatial", "action", "spatial_action"]
        assert batch.details["spatial"][1] is None and batch.details["action"][0] is None
        for i, kind in enumerate(batch.details["complex_kind"]):
            parts = [batch.details["attribute"][i], batch.details["spatial"][i], batch.details["action"][i]]
            expected = R.three_in_one(kind, *parts)
            assert batch.scores[i] == pytest.approx(expected)
        assert batch.details["spatial"][0] == 0.0  # "on top of" has no rule branch: always 0 (official)


def test_blip_reads_the_yes_and_no_tokens(tiny):
    scorer = CompBenchScorer("color", **tiny)
    images, prompts = _images(2), ["a red car", "a green bench and a blue bowl"]
    model, tokenizer = tiny["blip_factory"]()
    bias = model.text_decoder.cls.predictions.bias
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    seen = []
    hook = model.text_encoder.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"][:, 0].tolist()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            bias[yes] += 30.0
        assert scorer.score(images, prompts, [{}, {}]).scores.tolist() == [1.0, 1.0]
        with torch.no_grad():
            bias[yes] -= 30.0
            bias[no] += 30.0
        assert scorer.score(images, prompts, [{}, {}]).scores.tolist() == [0.0, 0.0]
    finally:
        with torch.no_grad():
            bias[no] -= 30.0
        hook.remove()
    assert seen and all(i == tokenizer.convert_tokens_to_ids("[ENC]") for ids in seen for i in ids)
    assert scorer.score(images[:1], ["."], [{}]).scores.tolist() == [1.0]  # no noun phrase -> 1


def test_clip_is_the_plain_cosine(tiny):
    from flowopd.scorers.clip_common import clip_pixel_values

    model, tokenizer = tiny["clip_factory"]()
    images, prompts = _images(2, seed=3), ["a cat", "a dog on a bench"]
    scores = CompBenchScorer("non_spatial", **tiny).score(images, prompts, [{}, {}]).scores
    with torch.no_grad():
        img = model.get_image_features(pixel_values=clip_pixel_values(images, 32))
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


class _StubDetector:
    """Returns fixed detections (rule-frame pixels) and records the queries it was asked."""

    def __init__(self, detections):
        self.detections, self.queries, self.sizes = detections, [], []

    def detect(self, images, queries):
        self.queries.extend(queries)
        self.sizes.extend(im.size for im in images)
        return [list(self.detections) for _ in images]


def test_spatial_and_numeracy_wiring_with_a_stub_detector(tiny):
    dog = Detection("dog", 0.9, (0, 0, 100, 100))
    cat = Detection("cat", 0.8, (300, 0, 400, 100))
    stub = _StubDetector([dog, cat])
    scorer = CompBenchScorer("spatial", detector=stub, nlp="fallback")
    images = torch.rand(2, 3, 512, 512)
    scores = scorer.score(
        images, ["a dog on the left of a cat", "a dog on the right of a cat"], [{}, {}]
    ).scores
    assert scores.tolist() == pytest.approx([0.925, 0.0])
    assert stub.sizes == [(479, 479), (479, 479)]  # the official detection frame
    assert ("dog", "dog") in stub.queries[0] and ("hot dog", "hot dog") in stub.queries[0]
    mouse = CompBenchScorer("spatial", detector=_StubDetector([]), nlp="fallback", label_space="prompt")
    mouse.score(images[:1], ["a mouse near a bag"], [{}])
    assert mouse._detector.queries == [[("mouse", "mouse"), ("bag", "bag")]]
    counter = CompBenchScorer(
        "numeracy", detector=_StubDetector([dog, Detection("dog", 0.5, (200, 200, 300, 300))])
    )
    batch = counter.score(images, ["two dogs", "three dogs and one cat"], [{}, {}])
    assert batch.scores.tolist() == pytest.approx([1.0, 0.25])
    assert batch.details["targets"] == ["dog:2", "dog:3|cat:1"]


def test_depth_map_is_the_official_png(tiny):
    depth = torch.linspace(0, 3, 8 * 8).view(8, 8)  # increasing along rows then columns
    out = DepthEstimator._official_png(depth, (512, 512), (479, 479))
    assert out.shape == (479, 479) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out[:, 0]) >= 0)  # order preserved through min-max, 8 bits and resizing
    flat = DepthEstimator._official_png(torch.ones(4, 4), (64, 64), (60, 60))
    assert (flat == 0).all()  # constant depth: no division by zero
    scorer = CompBenchScorer("3d_spatial", **tiny)
    maps = scorer.depth().depth_maps([Image.new("RGB", (512, 512))], [(479, 479)])
    assert maps[0].shape == (479, 479)


def test_dpt_hybrid_runs_at_the_official_input_size_not_its_own():
    """Intel/dpt-hybrid-midas was converted at 384 px and refuses 480 px unless told; MiDaS ran it at 480."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    backbone = BitConfig(
        global_padding="same",
        layer_type="bottleneck",
        depths=[1, 1, 1],
        hidden_sizes=[16, 32, 64],
        out_features=["stage1", "stage2", "stage3"],
        embedding_dynamic_padding=True,
        num_groups=2,
    )
    cfg = DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 32, 16, 16],
        fusion_hidden_size=16,
        backbone_featmap_shape=[1, 64, 4, 4],
        readout_type="project",
    )
    torch.manual_seed(4)
    model = DPTForDepthEstimation(cfg).eval()
    with pytest.raises(ValueError, match="doesn't match"):
        model(pixel_values=torch.zeros(1, 3, 96, 96))
    gradient = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (80, 1))).convert("RGB")
    (depth,) = DepthEstimator(model, torch.device("cpu"), input_size=96).depth_maps([gradient], [(70, 90)])
    assert depth.shape == (70, 90) and depth.min() == 0.0 and 0.9 < depth.max() <= 1.0


@pytest.mark.parametrize(
    "category, method, model_id, option",
    [
        ("color", "blip", "Salesforce/blip-vqa-base", "blip_model"),
        ("spatial", "detector", "google/owlv2-base-patch16-ensemble", "detector_model"),
        ("3d_spatial", "depth", "Intel/dpt-hybrid-midas", "depth_model"),
        ("non_spatial", "clip", "openai/clip-vit-base-patch32", "clip_model"),
    ],
)
def test_offline_loading_names_the_model_and_the_option(
    monkeypatch, tmp_path, category, method, model_id, option
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    scorer = CompBenchScorer(category, nlp="fallback", device="cpu")
    with pytest.raises(OSError) as err:
        getattr(scorer, method)()
    assert model_id in str(err.value) and option in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="category"):
        CompBenchScorer("colour")
    with pytest.raises(ValueError, match="label_space"):
        CompBenchScorer("spatial", label_space="coco")
    scorer = CompBenchScorer("spatial", detector=_StubDetector([]), nlp="fallback")
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(torch.rand(2, 3, 8, 8), ["a dog near a cat"], [{}])
    with pytest.raises(ValueError, match="float"):
        scorer.score(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a dog near a cat"], [{}])
