"""Engine labels (results.json, report markers), engine="official" through the scorer server, OCR engine choice,
HPS precision: the official-default switches of docs/scorers/parity.md, on weight-free or tiny scorers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from flowopd.bench.report import NON_OFFICIAL_MARK, markdown_summary, write_report
from flowopd.bench.results import SCHEMA_VERSION
from flowopd.scorers import official
from flowopd.scorers.base import Scale, ScoreBatch
from flowopd.scorers.engine import engine_fields, engine_record, is_official, version_fields
from flowopd.scorers.server import make_server


class LabelledScorer:
    """Mean brightness, labelled with an engine in its version (as our scorers and the official wrappers are)."""

    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(self, name: str, engine: str, official: bool) -> None:
        self.name = name
        self.version = "code=1;" + engine_fields(engine, "9.9", "ckpt-1", "fp32", official)

    def score(self, images, prompts, metadata=None):
        return ScoreBatch(images.double().mean(dim=(1, 2, 3)).numpy())


@pytest.fixture
def serve():
    servers = []

    def start(scorer):
        srv = make_server(scorer, port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.url

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------------------------- the label


def test_engine_fields_round_trip_and_refuse_separators():
    fields = version_fields("code=1;model=x;" + engine_fields("hpsv2", "1.2.0", "a/b:c.pt", "fp16", True))
    assert fields["engine"] == "hpsv2" and fields["checkpoint"] == "a/b:c.pt" and fields["official"] == "1"
    with pytest.raises(ValueError, match="checkpoint='a;b' contains ';'"):
        engine_fields("x", "1", "a;b", "fp32", False)


def test_engine_record_of_ports_official_mini_and_unknown_scorers():
    port = engine_record(LabelledScorer("hps", "flowopd-port", False))
    assert port == {"engine": "flowopd-port", "engine_version": "9.9", "checkpoint": "ckpt-1", "precision": "fp32",
                    "official": False}
    assert engine_record(LabelledScorer("hps", "hpsv2", True))["official"] is True

    class Mini:
        name, version = "mini-ocr", "mini-ocr-3"

    class ThirdParty:
        name, version = "my-score", "7"

    assert engine_record(Mini())["official"] is True and engine_record(Mini())["engine"] == "flowopd-mini-world"
    assert engine_record(ThirdParty())["official"] is None  # unknown: marked in reports too


def _results(engines: dict[str, dict | None]) -> dict:
    metric = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "stderr": 0.05, "n": 4}
    benchmarks = {}
    for bench, engine in engines.items():
        entry = {"metrics": {"mean": dict(metric)}, "n_prompts": 4, "images": "/nonexistent"}
        if engine is not None:
            entry["engine"] = engine
        benchmarks[bench] = entry
    return {"schema": SCHEMA_VERSION, "checkpoint": "ckpt", "benchmarks": benchmarks, "metrics": {}}


def test_report_marks_non_official_cells_with_a_footnote(tmp_path):
    res = _results({
        "hps": {"engine": "flowopd-port", "official": False},
        "pickscore": {"engine": "official-thing", "official": True},
        "old": None,  # a results.json written before engine labels: left unmarked
    })
    assert is_official(res["benchmarks"]["hps"]) is False and is_official(res["benchmarks"]["old"]) is None
    summary = markdown_summary(res)
    lines = {line.split("|")[1].strip(): line
             for line in summary.splitlines() if line.startswith("| ") and "mean" in line}
    assert f"0.500{NON_OFFICIAL_MARK}" in lines["hps"]
    assert NON_OFFICIAL_MARK not in lines["pickscore"] and NON_OFFICIAL_MARK not in lines["old"]
    assert "non-official engine" in summary
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(res))
    md = Path(write_report([tmp_path / "run"], tmp_path / "out")["md"]).read_text()
    table = md.split("\n\n")[1]  # the table before the per-run summaries
    assert f"{NON_OFFICIAL_MARK}" in table.splitlines()[2] and "non-official engine" in md


@pytest.mark.slow  # generates with the mini model: about 10 s alone, minutes on a loaded 2-core machine
def test_evaluate_records_the_engine_of_every_benchmark_and_report_marks_it(tmp_path):
    """A real (mini) evaluation: the exact mini scorer is its own official engine; an injected port is not."""
    from flowopd.bench.cli import main
    from flowopd.bench.evaluate import evaluate

    port = LabelledScorer("mini-quality", "flowopd-port", False)
    res = evaluate(benchmarks=["mini-ocr", "mini-quality"], out=tmp_path / "run", limit=1, progress=False,
                   scorers={"mini-quality": port}, log=lambda _: None)
    engines = {b: e["engine"] for b, e in res["benchmarks"].items()}
    assert engines["mini-ocr"]["official"] is True and engines["mini-ocr"]["engine"] == "flowopd-mini-world"
    assert engines["mini-quality"] == {"engine": "flowopd-port", "engine_version": "9.9", "checkpoint": "ckpt-1",
                                       "precision": "fp32", "official": False}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["benchmarks"]["mini-quality"]["engine"]["official"] is False
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    quality = [line for line in md.splitlines() if line.startswith("| mini-quality")]
    ocr = [line for line in md.splitlines() if line.startswith("| mini-ocr")]
    assert quality and all(NON_OFFICIAL_MARK in line for line in quality)
    assert ocr and not any(NON_OFFICIAL_MARK in line for line in ocr)


# ---------------------------------------------------------------------------------------------- engine="official"


@pytest.mark.parametrize("name", sorted(official.OFFICIAL))
def test_official_engine_without_package_or_server_is_one_clear_line(name, monkeypatch):
    monkeypatch.setattr(official, "package_available", lambda _: False)
    with pytest.raises(official.OfficialEngineUnavailable) as err:
        official.official_or_remote(name, "http://127.0.0.1:9", lambda: pytest.fail("package path taken"))
    message = str(err.value)
    assert "\n" not in message and f"serve(scorer='{name}-official')" in message and "127.0.0.1:9" in message
    assert isinstance(err.value, OSError)  # the bench CLI turns OSErrors into one line and exit status 1


def test_official_engine_scores_through_the_official_server(serve, monkeypatch):
    from flowopd.scorers.hps import HPSScorer

    monkeypatch.setattr(official, "package_available", lambda _: False)
    url = serve(LabelledScorer("hps", "hpsv2", True))
    scorer = HPSScorer(engine="official", official_url=url)
    images = torch.rand(3, 3, 8, 8)
    batch = scorer.score(images, ["a", "b", "c"])
    np.testing.assert_allclose(batch.scores, (images * 255).round().double().mean(dim=(1, 2, 3)).numpy() / 255,
                               atol=1e-12)
    record = engine_record(scorer)
    assert record["engine"] == "hpsv2" and record["official"] is True


def test_official_engine_refuses_a_server_running_a_port(serve, monkeypatch):
    from flowopd.scorers.imagereward import ImageRewardScorer

    monkeypatch.setattr(official, "package_available", lambda _: False)
    url = serve(LabelledScorer("imagereward", "flowopd-port", False))
    with pytest.raises(official.OfficialEngineUnavailable, match="does not run the official engine"):
        ImageRewardScorer(engine="official", official_url=url)


@pytest.mark.parametrize("cls_path", ["imagereward:ImageRewardScorer", "hps:HPSScorer", "aesthetic:AestheticScorer"])
def test_bad_engine_is_refused_naming_the_option(cls_path):
    import importlib

    module, cls = cls_path.split(":")
    scorer_cls = getattr(importlib.import_module(f"flowopd.scorers.{module}"), cls)
    with pytest.raises(ValueError, match=r"engine must be one of \('port', 'official'\), got 'orig'"):
        scorer_cls(engine="orig")


# ---------------------------------------------------------------------------------------------- OCR, HPS


def test_ocr_auto_engine_choice_is_recorded(tmp_path, monkeypatch):
    from flowopd.scorers import ocr

    monkeypatch.setattr(ocr, "paddleocr_model_dirs",
                        lambda options=None, lang="en": (_ for _ in ()).throw(ImportError("no paddle")))
    assert ocr.choose_engine("auto") == ("rapidocr", "paddleocr unavailable (no paddle)")
    dirs = {k: tmp_path / k for k in ("det", "rec", "cls")}
    monkeypatch.setattr(ocr, "paddleocr_model_dirs",
                        lambda options=None, lang="en": {k: str(v) for k, v in dirs.items()})
    engine, why = ocr.choose_engine("auto")
    assert engine == "rapidocr" and "models missing" in why
    for d in dirs.values():
        d.mkdir()
        (d / "inference.pdmodel").write_bytes(b"x")
        (d / "inference.pdiparams").write_bytes(b"x")
    assert ocr.choose_engine("auto") == ("paddleocr", "paddleocr and its models present")
    assert ocr.choose_engine("rapidocr") == ("rapidocr", "requested")


def test_ocr_default_engine_records_its_choice():
    """The default is "auto": here (no PaddleOCR) it falls back to rapidocr, and the version says so."""
    pytest.importorskip("rapidocr_onnxruntime")
    from flowopd.scorers.ocr import OCRScorer, choose_engine

    expected, _ = choose_engine("auto")
    scorer = OCRScorer()
    record = engine_record(scorer)
    assert scorer.engine_name == expected
    assert record["engine"] == ("rapidocr-onnxruntime" if expected == "rapidocr" else "paddleocr")
    assert record["official"] is (expected == "paddleocr")


def test_hps_precision_fp32_on_cpu_amp_on_request_and_refuses_bad_values():
    from test_scorer_hps import TINY_CFG, open_clip_state_dict, tiny_clip_tokenizer

    from flowopd.scorers.hps import HPSScorer, clip_config_from_open_clip, convert_open_clip_state_dict

    def factory():
        tokenizer = tiny_clip_tokenizer()
        cfg = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "vocab_size": len(tokenizer)}}
        from transformers import CLIPModel

        model = CLIPModel(clip_config_from_open_clip(cfg, eos_token_id=tokenizer.eos_token_id,
                                                     bos_token_id=tokenizer.bos_token_id))
        model.load_state_dict(convert_open_clip_state_dict(open_clip_state_dict(cfg)), strict=False)
        return model, tokenizer

    auto = HPSScorer(factory=factory, device="cpu")
    assert auto.amp is False and engine_record(auto)["precision"] == "float32"  # the release: fp16 on CUDA only
    amp = HPSScorer(factory=factory, device="cpu", precision="amp")
    assert amp.amp is True and engine_record(amp)["precision"] == "amp-fp16"
    images = torch.rand(2, 3, 32, 32)
    fp32, half = auto.score(images, ["a cat", "a dog"]).scores, amp.score(images, ["a cat", "a dog"]).scores
    assert np.isfinite(half).all() and np.abs(fp32 - half).max() < 5e-2
    with pytest.raises(ValueError, match="precision must be one of"):
        HPSScorer(factory=factory, device="cpu", precision="fp16")
