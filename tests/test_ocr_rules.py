"""OCR accuracy rule against hand-computed cases (flow_grpo/ocr.py semantics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowopd.scorers.ocr_rules import normalise_text, ocr_accuracy, target_text


def data_dir() -> Path:
    env = os.environ.get("FLOWOPD_DATA_DIR")
    return Path(env) if env else Path(__file__).parents[2] / "shared" / "data"


def test_target_text_first_pair_as_written() -> None:
    assert target_text('A sign saying "Hello World" on a wall') == "Hello World"
    assert target_text('"Open" and "Closed" signs') == "Open"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a photo of a dog", "no text between a pair"),
        ('a lone "quote here', "no text between a pair"),
        ('an empty "" sign', "empty quoted text"),
        ('a blank "   " sign', "empty quoted text"),
    ],
)
def test_target_text_errors_name_the_prompt(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        target_text(prompt)
    assert repr(prompt) in str(err.value)


def test_every_benchmark_prompt_has_a_target() -> None:
    path = data_dir() / "flowgrpo" / "ocr" / "test.txt"
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(prompts) == 1018
    assert all(normalise_text(target_text(p)) for p in prompts)


def test_normalise_text_lowercases_and_removes_spaces_only() -> None:
    assert normalise_text("Hello  World ") == "helloworld"
    assert normalise_text("A\tB\nC") == "a\tb\nc"  # flow_grpo removes ' ' only


PROMPT = 'A neon sign reading "Hello World" at night'


def test_exact_and_normalised_match() -> None:
    assert ocr_accuracy(PROMPT, "Hello World") == 1.0
    assert ocr_accuracy(PROMPT, "HELLOWORLD") == 1.0
    assert ocr_accuracy(PROMPT, "h e l l o w o r l d") == 1.0


def test_substring_gives_zero_distance() -> None:
    assert ocr_accuracy(PROMPT, "OPEN 24h hello world cafe") == 1.0


def test_pieces_are_concatenated_without_separator() -> None:
    assert ocr_accuracy(PROMPT, ["Hel", "lo Wor", "ld"]) == 1.0
    assert ocr_accuracy(PROMPT, ["World", "Hello"]) < 1.0  # order matters: "worldhello"


def test_levenshtein_distance() -> None:
    assert ocr_accuracy(PROMPT, "Helo World") == pytest.approx(1 - 1 / 10)
    assert ocr_accuracy('the word "sitting"', "kitten") == pytest.approx(1 - 3 / 7)


def test_distance_clipped_at_target_length() -> None:
    # Levenshtein("averylongunrelatedcaption", "hi") = 24 > 2: clipped to 2, score 0 rather than negative
    assert ocr_accuracy('a "Hi" sign', "a very long unrelated caption") == 0.0
    assert ocr_accuracy('a "Hi" sign', "") == 0.0
    assert ocr_accuracy('a "Hi" sign', []) == 0.0


def test_confidence_filter_drops_non_positive_pieces() -> None:
    prompt = 'a sign "ab"'
    assert ocr_accuracy(prompt, ["a", "x", "b"]) == pytest.approx(0.5)  # "axb": one deletion
    assert ocr_accuracy(prompt, ["a", "x", "b"], confidences=[0.9, 0.0, 0.8]) == 1.0
    assert ocr_accuracy(prompt, ["a", "x", "b"], confidences=[0.9, 0.1, 0.8]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 confidences for 3"):
        ocr_accuracy(prompt, ["a", "x", "b"], confidences=[0.9, 0.1])


def test_prompt_without_quotes_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="a photo of a dog"):
        ocr_accuracy("a photo of a dog", "dog")


text_st = st.text(alphabet="abcAB xyz", max_size=12)


@given(st.text(alphabet="abcAB xyz", min_size=1, max_size=8).filter(lambda t: t.strip(" ")), text_st)
def test_score_bounded_and_one_iff_substring(target: str, recognised: str) -> None:
    score = ocr_accuracy(f'write "{target}" here', recognised)
    assert 0.0 <= score <= 1.0
    assert (score == 1.0) == (normalise_text(target) in normalise_text(recognised))
