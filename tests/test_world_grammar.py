"""The mini world's prompt grammar: GenEval metadata format, fixed sets, disjoint splits, held-out combinations."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest

from flowopd.scorers.geneval_rules import validate_metadata
from flowopd.scorers.ocr_rules import target_text
from flowopd.world import grammar
from flowopd.world.grammar import (
    ALPHABET,
    COLORS,
    COMPBENCH_CATEGORIES,
    GENEVAL_TAGS,
    HELDOUT_COLOR_SHAPE,
    HELDOUT_COUNT_SHAPE,
    HELDOUT_RELATION_SHAPE,
    RELATIONS,
    SHAPES,
    heldout_reasons,
    is_heldout,
    prompt_set,
    sample_prompt,
    tokenize,
    vocabulary,
)


def all_sets() -> dict[tuple[str, str], list[dict]]:
    return {
        ("geneval", "train"): prompt_set("geneval", "train"),
        ("geneval", "test"): prompt_set("geneval", "test"),
        ("geneval", "heldout"): prompt_set("geneval", "heldout"),
        ("ocr", "train"): prompt_set("ocr", "train"),
        ("ocr", "test"): prompt_set("ocr", "test"),
        ("compbench", "heldout"): prompt_set("compbench", "heldout"),
    }


def test_constants_are_the_fixed_design():
    assert grammar.IMAGE_SIZE == 32
    assert COLORS == ("red", "green", "blue", "yellow")
    assert SHAPES == ("circle", "square", "triangle")
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert grammar.TASKS == ("geneval", "ocr", "compbench")
    assert len(ALPHABET) == 10 and len(set(ALPHABET)) == 10
    assert set(grammar.PALETTE) == set(COLORS)


def test_fixed_set_sizes_and_balance():
    test = prompt_set("geneval", "test")
    assert len(test) == 96
    assert collections.Counter(m["tag"] for m in test) == dict.fromkeys(GENEVAL_TAGS, 16)
    ocr = prompt_set("ocr", "test")
    assert len(ocr) == 32 and collections.Counter(len(m["text"]) for m in ocr) == {2: 16, 3: 16}
    comp = prompt_set("compbench", "heldout")
    assert len(comp) == 128
    assert collections.Counter(m["category"] for m in comp) == dict.fromkeys(COMPBENCH_CATEGORIES, 32)
    assert len(prompt_set("ocr", "train")) == 10**2 + 10**3 - 32


def test_sets_are_deterministic_and_fresh_copies():
    a, b = prompt_set("geneval", "test"), prompt_set("geneval", "test")
    assert a == b
    a[0]["include"][0]["class"] = "mutated"
    assert prompt_set("geneval", "test") == b


def test_geneval_metadata_format_matches_the_official_records():
    """Key order, exclude only when non-empty, and the official templates of each tag."""
    for (task, _), metas in all_sets().items():
        if task == "ocr":
            continue
        for m in metas:
            validate_metadata(m)
            keys = [k for k in m if k != "category"]
            assert keys == (
                ["tag", "include", "exclude", "prompt"] if "exclude" in m else ["tag", "include", "prompt"]
            )
            assert m["prompt"].startswith("a photo of ")
            if "exclude" in m:
                assert m["exclude"], m
    for m in prompt_set("geneval", "test"):
        inc = m["include"]
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": c["class"], "count": c["count"] + 1} for c in inc]
            assert (
                m["prompt"]
                == f"a photo of {['', 'a', 'two', 'three', 'four'][inc[0]['count']]} {inc[0]['class']}s"
            )
        if m["tag"] == "position":
            subject, ref = inc[1], inc[0]
            assert subject["position"][1] == 0
            assert m["prompt"] == f"a photo of a {subject['class']} {subject['position'][0]} a {ref['class']}"
        if m["tag"] == "color_attr":
            assert (
                m["prompt"]
                == f"a photo of a {inc[0]['color']} {inc[0]['class']} and a {inc[1]['color']} {inc[1]['class']}"
            )


def test_official_geneval_file_uses_the_same_clause_shapes():
    """The official metadata (if present) has the structure our templates copy, tag by tag."""
    path = Path(os.environ.get("FLOWOPD_DATA_DIR", "")) / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    official = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def signature(m: dict) -> tuple:
        return (m["tag"], "exclude" in m, tuple(tuple(sorted(c)) for c in m["include"]))

    ours = {signature(m) for m in prompt_set("geneval", "test") + prompt_set("geneval", "train")}
    theirs = {signature(m) for m in official}
    assert ours <= theirs, ours - theirs
    by_tag = collections.defaultdict(set)
    for m in official:
        by_tag[m["tag"]].add(m["prompt"].split(" ")[:3] == ["a", "photo", "of"])
    assert all(v == {True} for v in by_tag.values())


def test_text_prompts_put_the_text_in_the_first_quotes():
    for m in prompt_set("ocr", "test") + prompt_set("ocr", "train")[:50]:
        assert m["tag"] == "text" and set(m["text"]) <= set(ALPHABET)
        assert target_text(m["prompt"]) == m["text"]
    with pytest.raises(ValueError, match="alphabet"):
        grammar.text_meta("ab")


def test_train_and_test_are_disjoint_where_the_space_allows():
    train = prompt_set("geneval", "train")
    test = prompt_set("geneval", "test")
    for tag in ("color_attr",):
        tr = {m["prompt"] for m in train if m["tag"] == tag}
        te = {m["prompt"] for m in test if m["tag"] == tag}
        assert len(te) == 16 and not tr & te
    # Small tags are shared (their whole space is in train) - documented, and checked to be exactly that.
    for tag in ("single_object", "two_object", "counting", "colors", "position"):
        tr = {m["prompt"] for m in train if m["tag"] == tag}
        assert {m["prompt"] for m in test if m["tag"] == tag} <= tr
    tr_text = {m["text"] for m in prompt_set("ocr", "train")}
    assert not tr_text & {m["text"] for m in prompt_set("ocr", "test")}


def test_heldout_combinations_never_occur_in_train_or_test():
    for key, metas in all_sets().items():
        for m in metas:
            assert is_heldout(m) == (key[1] == "heldout"), (key, m["prompt"], heldout_reasons(m))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for _ in range(1500):
            m = sample_prompt(rng, split)
            assert not is_heldout(m), m
            text = m["prompt"]
            for color, shape in HELDOUT_COLOR_SHAPE:
                assert f"{color} {shape}" not in text
            for rel, shape in HELDOUT_RELATION_SHAPE:
                assert f"{shape} {rel}" not in text
            for n, shape in HELDOUT_COUNT_SHAPE:
                assert f"{['', 'a', 'two', 'three', 'four'][n]} {shape}" not in text
    heldout_prompts = {
        m["prompt"] for m in prompt_set("geneval", "heldout") + prompt_set("compbench", "heldout")
    }
    assert not heldout_prompts & {m["prompt"] for m in prompt_set("geneval", "train")}


def test_each_category_tests_its_own_held_out_axis():
    for m in prompt_set("compbench", "heldout"):
        reasons = " ".join(heldout_reasons(m))
        expected = {
            "color": "colour-shape",
            "shape": "three shapes",
            "spatial": "relation-shape",
            "numeracy": "count-shape",
        }[m["category"]]
        assert expected in reasons, (m, reasons)
        assert m["tag"] in GENEVAL_TAGS


def test_sample_prompt_mixture_and_determinism():
    rng = np.random.default_rng(7)
    draws = [sample_prompt(rng) for _ in range(2000)]
    share = sum(m["tag"] == "text" for m in draws) / len(draws)
    assert 0.21 < share < 0.29
    tags = collections.Counter(m["tag"] for m in draws if m["tag"] != "text")
    assert set(tags) == set(GENEVAL_TAGS) and min(tags.values()) > 180
    again = [sample_prompt(np.random.default_rng(7)) for _ in range(1)]
    assert again[0] == draws[0]
    assert sample_prompt(np.random.default_rng(1), "heldout")["category"] in COMPBENCH_CATEGORIES
    assert is_heldout(sample_prompt(np.random.default_rng(1), "heldout", "geneval"))


@pytest.mark.parametrize(
    ("task", "split", "match"),
    [
        ("ocr", "heldout", "no heldout"),
        ("compbench", "train", "only on split"),
        ("nope", "test", "unknown task"),
        ("geneval", "val", "unknown split"),
    ],
)
def test_errors_name_the_problem(task, split, match):
    with pytest.raises(ValueError, match=match):
        prompt_set(task, split)


def test_vocabulary_covers_every_prompt():
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab)
    for metas in all_sets().values():
        for m in metas:
            assert set(tokenize(m["prompt"])) <= vocab, m["prompt"]
    assert set(ALPHABET) | {'"'} <= vocab
    assert tokenize('a sign that says "B7"') == ["a", "sign", "that", "says", '"', "B", "7", '"']
