"""GenEval rule engine against hand-made detections (official evaluate_images.py semantics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowopd.scorers.geneval_rules import (
    COLORS,
    MAX_OBJECTS,
    TAGS,
    Detection,
    GenEvalResult,
    compute_iou,
    evaluate_geneval,
    filter_detections,
    relative_position,
    score_geneval,
    validate_metadata,
)


def det(x1: float, y1: float, x2: float, y2: float, score: float = 0.95, color: str | None = None) -> Detection:
    return Detection(box=(x1, y1, x2, y2), score=score, color=color)


def data_dir() -> Path:
    env = os.environ.get("FLOWOPD_DATA_DIR")
    return Path(env) if env else Path(__file__).parents[2] / "shared" / "data"


# --- constants and data classes ----------------------------------------------------------------------


def test_constants_match_official() -> None:
    assert COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    assert set(TAGS) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_detection_rejects_bad_box_and_mask() -> None:
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        Detection(box=(0, 0, 1), score=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        Detection(box=(0, 0, 1, 1), score=0.5, mask=np.zeros((2, 2, 3), bool))
    assert Detection(box=(0, 0, 1, 1), score=0.5, mask=np.zeros((4, 4), bool)).mask.shape == (4, 4)


# --- compute_iou ---------------------------------------------------------------------------------------


def test_compute_iou_uses_inclusive_pixels() -> None:
    # (0..9) x (0..9) is 100 pixels; overlap with (5..14) x (0..9) is 50; union 150
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    assert compute_iou((0, 0, -5, -5), (0, 0, -5, -5)) == 0.0  # empty union


box_st = st.tuples(*[st.floats(0, 100, allow_nan=False)] * 4).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)


@given(box_st, box_st)
def test_compute_iou_symmetric_and_bounded(a, b) -> None:
    assert compute_iou(a, b) == pytest.approx(compute_iou(b, a))
    assert 0.0 <= compute_iou(a, b) <= 1.0 + 1e-12


# --- filter_detections ---------------------------------------------------------------------------------


def test_counting_threshold_only_for_counting_tag() -> None:
    raw = {"clock": [det(0, 0, 10, 10, 0.89), det(50, 0, 60, 10, 0.91)]}
    assert [d.score for d in filter_detections(raw, "counting")["clock"]] == [0.91]
    assert [d.score for d in filter_detections(raw, "two_object")["clock"]] == [0.91, 0.89]


def test_threshold_is_strict_sorted_and_empty_classes_dropped() -> None:
    raw = {
        "dog": [det(0, 0, 1, 1, 0.5), det(0, 0, 1, 1, 0.3), det(0, 0, 1, 1, 0.8), det(0, 0, 1, 1, 0.31)],
        "cat": [det(0, 0, 1, 1, 0.2)],
        "cow": [],
    }
    kept = filter_detections(raw, "single_object")
    assert list(kept) == ["dog"]
    assert [d.score for d in kept["dog"]] == [0.8, 0.5, 0.31]


def test_ties_keep_input_order() -> None:
    first, second = det(0, 0, 1, 1, 0.7), det(5, 5, 6, 6, 0.7)
    kept = filter_detections({"dog": [first, second]}, "single_object")["dog"]
    assert kept[0] is first and kept[1] is second


def test_max_objects_cap_keeps_most_confident() -> None:
    scores = [0.31 + 0.03 * i for i in range(20)]
    raw = {"dog": [det(i * 20, 0, i * 20 + 10, 10, s) for i, s in enumerate(scores)]}
    kept = filter_detections(raw, "single_object")["dog"]
    assert len(kept) == MAX_OBJECTS == 16
    assert [d.score for d in kept] == sorted(scores, reverse=True)[:16]
    assert len(filter_detections(raw, "single_object", max_objects=3)["dog"]) == 3


def test_nms_off_by_default_and_on_when_asked() -> None:
    raw = {"dog": [det(0, 0, 9, 9, 0.9), det(0, 0, 9, 9, 0.8), det(1, 0, 10, 9, 0.7), det(50, 50, 59, 59, 0.6)]}
    assert len(filter_detections(raw, "single_object")["dog"]) == 4  # official NMS_THRESHOLD = 1.0: no NMS
    kept = filter_detections(raw, "single_object", nms_threshold=0.5)["dog"]
    assert [d.score for d in kept] == [0.9, 0.6]


@given(
    st.lists(st.floats(0, 1, allow_nan=False), max_size=40),
    st.sampled_from(TAGS),
)
def test_filter_invariants(scores, tag) -> None:
    raw = {"dog": [det(0, 0, 1, 1, s) for s in scores]}
    kept = filter_detections(raw, tag).get("dog", [])
    cutoff = 0.9 if tag == "counting" else 0.3
    assert len(kept) == min(MAX_OBJECTS, sum(s > cutoff for s in scores))
    assert all(d.score > cutoff for d in kept)
    assert [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)


# --- relative_position ---------------------------------------------------------------------------------


B = det(100, 100, 120, 120)  # reference object, 20 x 20


@pytest.mark.parametrize(
    ("a", "expected"),
    [
        (det(10, 100, 30, 120), {"left of"}),
        (det(200, 100, 220, 120), {"right of"}),
        (det(100, 10, 120, 30), {"above"}),  # image y grows downwards
        (det(100, 200, 120, 220), {"below"}),
        (det(200, 200, 220, 220), {"right of", "below"}),  # diagonal: both components 0.707 - margin
        (det(100, 100, 120, 120), set()),  # same box
    ],
)
def test_relations(a: Detection, expected: set[str]) -> None:
    assert relative_position(a, B) == expected


def test_margin_removes_relation_of_overlapping_boxes() -> None:
    a, b = det(0, 0, 10, 10), det(1.5, 0, 11.5, 10)
    # centre offset -1.5 is within 0.1 * (10 + 10) = 2, so the revised offset is 0: no relation
    assert relative_position(a, b) == set()
    assert relative_position(a, b, margin=0.0) == {"left of"}
    # a 3-pixel offset leaves 1 after the margin, yet still counts fully: revised/|offset| = 1/3 < 0.5
    assert relative_position(det(0, 0, 10, 10), det(3, 0, 13, 10)) == set()
    assert relative_position(det(0, 0, 10, 10), det(5, 0, 15, 10)) == {"left of"}  # 3/5 > 0.5


def test_mostly_horizontal_offset_gives_one_relation() -> None:
    # offset (100, 30): dy = (30 - 4) / 104.4 = 0.25 < 0.5, dx = (100 - 4) / 104.4 = 0.92
    assert relative_position(det(200, 130, 220, 150), B) == {"right of"}


SWAP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@given(box_st, box_st)
def test_relative_position_antisymmetric(a, b) -> None:
    da, db = Detection(box=a, score=1.0), Detection(box=b, score=1.0)
    assert {SWAP[r] for r in relative_position(da, db)} == relative_position(db, da)
    assert not ({"left of", "right of"} <= relative_position(da, db))


# --- evaluate_geneval ----------------------------------------------------------------------------------


def meta(tag: str, include: list, exclude: list | None = None) -> dict:
    m = {"tag": tag, "include": include, "prompt": "test"}
    if exclude is not None:
        m["exclude"] = exclude
    return m


def test_single_object_pass_and_fail() -> None:
    m = meta("single_object", [{"class": "dog", "count": 1}])
    assert evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)]}) == GenEvalResult(True, "")
    assert evaluate_geneval(m, {"cat": [det(0, 0, 1, 1)]}) == GenEvalResult(False, "expected dog>=1, found 0")


def test_two_object_reports_every_failed_clause() -> None:
    m = meta("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}])
    assert evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)], "cat": [det(5, 5, 6, 6)]}).correct
    result = evaluate_geneval(m, {})
    assert result == GenEvalResult(False, "expected dog>=1, found 0\nexpected cat>=1, found 0")


def test_counting_with_exclude_clause() -> None:
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    clocks = [det(i * 20, 0, i * 20 + 10, 10) for i in range(3)]
    assert evaluate_geneval(m, {"clock": clocks[:2]}).correct
    assert evaluate_geneval(m, {"clock": clocks[:1]}) == GenEvalResult(False, "expected clock>=2, found 1")
    assert evaluate_geneval(m, {"clock": clocks}) == GenEvalResult(False, "expected clock<3, found 3")


def test_exclude_of_absent_class_passes() -> None:
    m = meta("single_object", [{"class": "dog", "count": 1}], [{"class": "cat", "count": 1}])
    assert evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)]}).correct
    assert evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)], "cat": [det(5, 5, 6, 6)]}) == GenEvalResult(
        False, "expected cat<1, found 1"
    )


def test_colour_miscount_one_of_two_wrong() -> None:
    m = meta("colors", [{"class": "dog", "count": 2, "color": "red"}])
    good = {"dog": [det(0, 0, 1, 1, 0.9, "red"), det(5, 5, 6, 6, 0.8, "red")]}
    bad = {"dog": [det(0, 0, 1, 1, 0.9, "blue"), det(5, 5, 6, 6, 0.8, "red")]}
    assert evaluate_geneval(m, good).correct
    assert evaluate_geneval(m, bad) == GenEvalResult(False, "expected red dog>=2, found 1 red; and 1 red, 1 blue")


def test_colour_judged_on_top_count_detections_only() -> None:
    m = meta("colors", [{"class": "dog", "count": 1, "color": "red"}])
    assert evaluate_geneval(m, {"dog": [det(0, 0, 1, 1, 0.9, "red"), det(5, 5, 6, 6, 0.8, "blue")]}).correct
    assert not evaluate_geneval(m, {"dog": [det(0, 0, 1, 1, 0.9, "blue"), det(5, 5, 6, 6, 0.8, "red")]}).correct


def test_colour_classifier_callable() -> None:
    calls = []

    def classify(classname, dets):
        calls.append((classname, [d.score for d in dets]))
        return ["green" if d.score > 0.85 else "pink" for d in dets]

    m = meta("color_attr",
             [{"class": "car", "count": 1, "color": "green"}, {"class": "bird", "count": 1, "color": "pink"}])
    dets = {"car": [det(0, 0, 1, 1, 0.9), det(2, 2, 3, 3, 0.5)], "bird": [det(5, 5, 6, 6, 0.6)]}
    assert evaluate_geneval(m, dets, classify).correct
    assert calls == [("car", [0.9]), ("bird", [0.6])]  # only the top-count detections are classified
    # a partly coloured group falls back to the classifier for all of it
    two_cars = meta("colors", [{"class": "car", "count": 2, "color": "green"}])
    mixed = {"car": [det(0, 0, 1, 1, 0.9, "red"), det(2, 2, 3, 3, 0.88)]}
    assert evaluate_geneval(two_cars, mixed, classify).correct
    assert calls[-1] == ("car", [0.9, 0.88])
    # a fully coloured group uses its own colours even when a classifier is given
    assert not evaluate_geneval(two_cars, {"car": [det(0, 0, 1, 1, 0.9, "red"), det(2, 2, 3, 3, 0.88, "green")]},
                                classify).correct
    assert len(calls) == 3


def test_colour_without_source_or_with_bad_classifier_raises() -> None:
    m = meta("colors", [{"class": "dog", "count": 1, "color": "red"}])
    with pytest.raises(ValueError, match="classify_colors"):
        evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)]})
    with pytest.raises(ValueError, match="2 colours for 1 'dog'"):
        evaluate_geneval(m, {"dog": [det(0, 0, 1, 1)]}, lambda c, d: ["red", "red"])


def position_meta(relation: str, target_color: str | None = None) -> dict:
    target = {"class": "teddy bear", "count": 1}
    if target_color:
        target["color"] = target_color
    return meta("position", [target, {"class": "dog", "count": 1, "position": [relation, 0]}])


@pytest.mark.parametrize(
    ("dog", "relation"),
    [((10, 100, 30, 120), "left of"), ((200, 100, 220, 120), "right of"),
     ((100, 10, 120, 30), "above"), ((100, 200, 120, 220), "below")],
)
def test_position_each_relation(dog, relation) -> None:
    dets = {"teddy bear": [B], "dog": [det(*dog)]}
    assert evaluate_geneval(position_meta(relation), dets).correct
    opposite = SWAP[relation]
    assert evaluate_geneval(position_meta(opposite), dets) == GenEvalResult(
        False, f"expected dog {opposite} target, found {relation} target"
    )


def test_position_overlapping_boxes_fail_with_empty_relation() -> None:
    dets = {"teddy bear": [det(0, 0, 10, 10)], "dog": [det(1.5, 0, 11.5, 10)]}
    assert evaluate_geneval(position_meta("right of"), dets) == GenEvalResult(
        False, "expected dog right of target, found  target"
    )


def test_position_two_relations_reason_is_sorted() -> None:
    dets = {"teddy bear": [B], "dog": [det(200, 200, 220, 220)]}
    assert evaluate_geneval(position_meta("left of"), dets).reason == (
        "expected dog left of target, found below and right of target"
    )


def test_position_missing_target_fails() -> None:
    result = evaluate_geneval(position_meta("right of"), {"dog": [det(200, 100, 220, 120)]})
    assert result == GenEvalResult(False, "expected teddy bear>=1, found 0\nno target for dog to be right of")


def test_position_target_failing_colour_counts_as_missing() -> None:
    dets = {"teddy bear": [det(100, 100, 120, 120, color="blue")], "dog": [det(200, 100, 220, 120)]}
    assert evaluate_geneval(position_meta("right of", "blue"), dets).correct
    result = evaluate_geneval(position_meta("right of", "red"), dets)
    assert not result.correct
    assert result.reason.endswith("\nno target for dog to be right of")


def test_position_must_hold_against_every_target() -> None:
    m = meta("position", [{"class": "cup", "count": 2}, {"class": "dog", "count": 1, "position": ["right of", 0]}])
    dog = det(200, 100, 220, 120)
    assert evaluate_geneval(m, {"cup": [B, det(10, 100, 30, 120)], "dog": [dog]}).correct
    result = evaluate_geneval(m, {"cup": [B, det(300, 100, 320, 120)], "dog": [dog]})
    assert result == GenEvalResult(False, "expected dog right of target, found left of target")


def test_colour_failure_skips_position_check() -> None:
    m = meta("position", [{"class": "cup", "count": 1},
                          {"class": "dog", "count": 1, "color": "red", "position": ["right of", 0]}])
    dets = {"cup": [B], "dog": [det(10, 100, 30, 120, color="blue")]}  # wrong colour and wrong side
    assert evaluate_geneval(m, dets) == GenEvalResult(False, "expected red dog>=1, found 0 red; and 1 blue")


# --- score_geneval -------------------------------------------------------------------------------------


def test_score_geneval_counting_threshold_end_to_end() -> None:
    raw = {"clock": [det(0, 0, 10, 10, 0.95), det(50, 0, 60, 10, 0.89)]}
    counting = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    assert score_geneval(counting, raw) == GenEvalResult(False, "expected clock>=2, found 1")
    raw91 = {"clock": [det(0, 0, 10, 10, 0.95), det(50, 0, 60, 10, 0.91)]}
    assert score_geneval(counting, raw91).correct
    two = meta("two_object", [{"class": "clock", "count": 2}])
    assert score_geneval(two, raw).correct


def test_score_geneval_cap_hides_extra_objects_from_exclude() -> None:
    raw = {"dog": [det(i * 20, 0, i * 20 + 10, 10, 0.5) for i in range(20)]}
    m = meta("single_object", [{"class": "dog", "count": 1}], [{"class": "dog", "count": 17}])
    assert score_geneval(m, raw).correct  # only 16 survive the cap
    m16 = meta("single_object", [{"class": "dog", "count": 1}], [{"class": "dog", "count": 16}])
    assert score_geneval(m16, raw) == GenEvalResult(False, "expected dog<16, found 16")


def test_score_geneval_with_classifier() -> None:
    m = meta("colors", [{"class": "dog", "count": 1, "color": "brown"}])
    raw = {"dog": [det(0, 0, 1, 1, 0.2), det(5, 5, 6, 6, 0.7)]}
    assert score_geneval(m, raw, lambda c, d: ["brown"] * len(d)).correct


# --- validate_metadata ---------------------------------------------------------------------------------


def test_every_official_metadata_line_is_valid() -> None:
    path = data_dir() / "geneval" / "evaluation_metadata.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(lines) == 553
    tags = set()
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        try:
            validate_metadata(record)
        except ValueError as err:  # pragma: no cover - only on a regression
            pytest.fail(f"{path}:{n}: {err}")
        tags.add(record["tag"])
    assert tags == set(TAGS)


GOOD = {"tag": "position", "prompt": "p", "include": [{"class": "cup", "count": 1},
                                                       {"class": "dog", "count": 1, "position": ["above", 0]}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tag": "shapes"}, "'tag' is 'shapes'"),
        ({"tag": None}, "'tag' is None"),
        ({"include": []}, "non-empty list"),
        ({"include": "dog"}, "non-empty list"),
        ({"exclude": "dog"}, "'exclude' must be a list"),
        ({"include": ["dog"]}, r"include\[0\] must be a mapping"),
        ({"include": [{"class": "dog", "count": 1, "colour": "red"}]}, "unknown keys"),
        ({"include": [{"class": "", "count": 1}]}, "'class' must be a non-empty string"),
        ({"include": [{"count": 1}]}, "'class' must be a non-empty string"),
        ({"include": [{"class": "dog", "count": 0}]}, "'count' must be an integer >= 1"),
        ({"include": [{"class": "dog", "count": True}]}, "'count' must be an integer >= 1"),
        ({"include": [{"class": "dog", "count": "2"}]}, "'count' must be an integer >= 1"),
        ({"include": [{"class": "dog", "count": 1, "color": "teal"}]}, "'color' is 'teal'"),
        ({"include": [{"class": "dog", "count": 1, "position": ["above"]}]}, r"\[relation, target index\]"),
        ({"include": [{"class": "dog", "count": 1, "position": "above"}]}, r"\[relation, target index\]"),
        ({"include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["near", 0]}]},
         "relation 'near'"),
        ({"include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 1]}]},
         r"target index 1 out of range.*index < 1"),
        ({"include": [{"class": "dog", "count": 1, "position": ["above", 0]}]}, "target index 0 out of range"),
        ({"include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["above", -1]}]},
         "target index -1 out of range"),
        ({"exclude": [{"class": "dog", "count": 1, "color": "red"}]}, r"exclude\[0\] has unknown keys"),
        ({"exclude": [{"class": "dog", "count": 0}]}, r"exclude\[0\]: 'count'"),
    ],
)
def test_validate_metadata_names_the_problem(change: dict, message: str) -> None:
    validate_metadata(GOOD)
    with pytest.raises(ValueError, match=message):
        validate_metadata({**GOOD, **change})


def test_validate_metadata_rejects_non_mapping_and_names_prompt() -> None:
    with pytest.raises(ValueError, match="expected a mapping"):
        validate_metadata(["tag"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt 'a photo of a dog'"):
        validate_metadata({"tag": "single_object", "include": [], "prompt": "a photo of a dog"})


def test_evaluate_validates_metadata_first() -> None:
    with pytest.raises(ValueError, match="target index"):
        evaluate_geneval(meta("position", [{"class": "dog", "count": 1, "position": ["above", 3]}]), {})
