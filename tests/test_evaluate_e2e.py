"""End to end: a tiny random SD3 pipeline on 4-prompt slices of geneval and ocr, detector and recogniser
injected into the real scorers; cache, per-sample rows, results and report; resume after an interruption."""

import json

import numpy as np
import pandas as pd
import pytest
from _tiny_sd3 import tiny_sd3_pipeline

from flowopd.bench.cli import main
from flowopd.bench.evaluate import evaluate
from flowopd.bench.report import write_report
from flowopd.models.sd3 import SD3Policy
from flowopd.scorers.geneval import GenEvalScorer
from flowopd.scorers.geneval_rules import Detection
from flowopd.scorers.ocr import OCRScorer

SMALL = {"height": 32, "width": 32, "steps": 2}


def brightness_detector(rgb):
    """A real (if crude) detector: the brighter half of the image holds one object of every class
    named in the prompt set, with a confidence given by its mean brightness."""
    h, w, _ = rgb.shape
    left, right = rgb[:, : w // 2].mean() / 255, rgb[:, w // 2 :].mean() / 255
    box = (0.0, 0.0, w / 2, h) if left >= right else (w / 2, 0.0, float(w), h)
    score = float(max(left, right))
    return {name: [Detection(box=box, score=score)] for name in ("bench", "cell phone", "oven", "dog", "cat")}


def colour_by_channel(image, classname, detections):
    names = ("red", "green", "blue")
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    out = []
    for det in detections:
        x1, y1, x2, y2 = (int(v) for v in det.box)
        out.append(names[int(arr[y1:y2, x1:x2].reshape(-1, 3).mean(0).argmax())])
    return out


class PixelReader:
    """A RapidOCR-shaped engine that 'reads' the brightest column's colour as a letter."""

    def __call__(self, bgr, **kwargs):
        letter = "ABCDEFGHIJ"[int(bgr.mean() / 25.6) % 10]
        return [[[[0, 0], [1, 0], [1, 1], [0, 1]], letter, 0.9]], 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    tiny_sd3_pipeline(tmp).save_pretrained(tmp / "pipe")
    return str(tmp / "pipe")


def scorers():
    return {
        "geneval": GenEvalScorer(detect_fn=brightness_detector, color_fn=colour_by_channel),
        "ocr": OCRScorer(engine_factory=PixelReader),
    }


class Interrupting:
    """Wraps a policy; raises KeyboardInterrupt at the n-th prompt batch (an interrupted run)."""

    def __init__(self, policy, stop_after=None):
        self.policy, self.stop_after, self.encoded = policy, stop_after, 0

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def encode_prompts(self, prompts):
        if self.stop_after is not None and self.encoded >= self.stop_after:
            raise KeyboardInterrupt
        self.encoded += len(prompts)
        return self.policy.encode_prompts(prompts)


def test_evaluate_tiny_sd3_end_to_end_with_resume(checkpoint, tmp_path):
    out = tmp_path / "run"
    policy = SD3Policy.from_pretrained(checkpoint)
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, ["geneval", "ocr"], out=out, limit=4, batch_size=4, generation=SMALL,
                 policy=Interrupting(policy, stop_after=8), scorers=scorers(), progress=False)
    made = sorted((out / "images").rglob("*.png"))
    assert len(made) == 8  # two batches of four geneval samples before the interruption
    stamps = {p: p.stat().st_mtime_ns for p in made}

    counting = Interrupting(policy)
    results = evaluate(checkpoint, ["geneval", "ocr"], out=out, limit=4, batch_size=4, generation=SMALL,
                       policy=counting, scorers=scorers(), progress=False)
    assert counting.encoded == 16 - 8 + 4  # only the missing geneval samples, then the 4 ocr images
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing regenerated

    # the cache has GenEval's layout
    meta = json.loads((out / "images" / "geneval" / "00002" / "metadata.jsonl").read_text())
    assert meta["tag"] and meta["prompt"]
    assert len(list((out / "images" / "geneval").glob("0000?/samples/000?.png"))) == 16
    assert len(list((out / "images" / "ocr").glob("0000?/samples/0000.png"))) == 4

    rows = pd.read_parquet(out / "scores" / "geneval.parquet")
    assert len(rows) == 16 and set(rows["score"].unique()) <= {0.0, 1.0}
    assert {"tag", "correct", "reason", "index", "sample", "scorer_version"} <= set(rows.columns)
    ocr_rows = pd.read_parquet(out / "scores" / "ocr.parquet")
    assert len(ocr_rows) == 4 and ocr_rows["text"].str.len().eq(1).all()

    geneval = results["benchmarks"]["geneval"]
    tag_means = rows.groupby("tag")["score"].mean()
    assert geneval["metrics"]["mean"]["value"] == pytest.approx(tag_means.mean())
    assert geneval["generation"]["steps"] == 2 and geneval["limit"] == 4
    assert results["metrics"]["ocr/mean"] == pytest.approx(ocr_rows["score"].mean())
    for entry in (geneval, results["benchmarks"]["ocr"]):
        m = entry["metrics"]["mean"]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert results["packages"]["torch"] and "scorer_version" in geneval

    paths = write_report([out], tmp_path / "report")
    assert "geneval/mean" in paths["md"].read_text()
    html = paths["html"].read_text()
    assert html.count("<img") == 16 + 4 == html.count("<img src='data:image/png;base64,")  # self-contained
    assert len(pd.read_csv(paths["csv"])) >= 2


def test_images_mode_scores_external_folders_and_names_corrupt_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    evaluate(checkpoint, ["ocr"], out=out, limit=3, generation=SMALL, scorers=scorers(), progress=False)
    external = out / "images" / "ocr"
    again = evaluate(None, ["ocr"], out=tmp_path / "ext", limit=3, images=external, scorers=scorers(),
                     progress=False)
    first = json.loads((out / "results.json").read_text())
    assert again["metrics"]["ocr/mean"] == first["metrics"]["ocr/mean"]
    assert again["checkpoint"].startswith("images:")

    (external / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG broken")
    code = main(["evaluate", "--images", str(external), "--benchmarks", "ocr", "--limit", "3",
                 "--out", str(tmp_path / "ext2"), "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: corrupt image") and "00001/samples/0000.png" in last


def test_offline_hub_id_error_names_the_model(tmp_path, capsys):
    code = main(["evaluate", "stabilityai/stable-diffusion-3.5-medium", "--benchmarks", "ocr", "--limit", "1",
                 "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "stabilityai/stable-diffusion-3.5-medium" in err and "--local-dir" in err
