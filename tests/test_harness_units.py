"""Registry, specs, prompt sets, aggregation, results, check: the harness's pure parts and its errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowopd.bench.aggregate import aggregate
from flowopd.bench.check import check_floors, load_thresholds
from flowopd.bench.cli import main
from flowopd.bench.images import CorruptImageError, load_png, sample_seed, save_png
from flowopd.bench.spec import all_specs, get_spec, parse_spec
from flowopd.data import PromptFileError, fetch_prompt_file, load_prompts
from flowopd.registry import Registry, UnknownNameError
from flowopd.scorers import SCORERS, ScoreBatch
from flowopd.specs import PromptSetSpec

#: validation analogues of the mini benchmarks (train-split prompts), found through FLOWOPD_BENCHMARKS_DIR
VAL_BENCHMARKS = Path(__file__).resolve().parents[1] / "training" / "val_benchmarks"

METHOD_BENCHMARKS = {
    "geneval", "ocr", "deqa", "pickscore", "imagereward", "aesthetic", "hps", "qwenvl",
    *(f"compbench-{c}" for c in
      ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")),
}


def test_every_method_benchmark_has_a_spec_with_a_registered_scorer():
    specs = all_specs()
    assert METHOD_BENCHMARKS <= set(specs)
    for spec in specs.values():
        assert spec.scorer in SCORERS
        assert spec.version


def test_registry_suggests_close_names_and_imports_lazily():
    reg = Registry("thing")
    reg.register("pickscore", "collections:OrderedDict")
    with pytest.raises(UnknownNameError, match="did you mean 'pickscore'"):
        reg.get("pikscore")
    assert reg.get("pickscore").__name__ == "OrderedDict"
    with pytest.raises(ValueError, match="already registered"):
        reg.register("pickscore", "collections:Counter")


def test_unknown_benchmark_is_a_one_line_error(capsys):
    assert main(["evaluate", "mini:base", "--benchmarks", "genevl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "genevl" in err and "did you mean 'geneval'" in err


def test_prompt_sets_load_with_pinned_hashes():
    assert len(load_prompts(get_spec("geneval").prompts)) == 553
    assert len(load_prompts(get_spec("ocr").prompts)) == 1018
    assert len(load_prompts(get_spec("pickscore").prompts)) == 2048
    rows = load_prompts(get_spec("compbench-color").prompts)
    assert len(rows) == 300 and rows[0]["category"] == "color"
    assert get_spec("compbench-color").prompts.sha256 != get_spec("compbench-color-flowopd").prompts.sha256


def test_malformed_prompt_file_names_file_and_line(tmp_path, monkeypatch, isolated_cache):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    monkeypatch.setenv("FLOWOPD_DATA_DIR", str(tmp_path))
    spec = PromptSetSpec(format="jsonl", path="p.jsonl")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompts(spec)
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(PromptFileError, match=r"q\.jsonl:2: expected an object with a string 'prompt'"):
        load_prompts(PromptSetSpec(format="jsonl", path="q.jsonl"))


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch, isolated_cache):
    (tmp_path / "p.txt").write_text("a prompt\n")
    monkeypatch.setenv("FLOWOPD_DATA_DIR", str(tmp_path))
    with pytest.raises(PromptFileError, match=r"p\.txt: sha256 mismatch"):
        fetch_prompt_file(PromptSetSpec(format="lines", path="p.txt", sha256="0" * 64))


def test_offline_download_error_says_how_to_provide_a_copy(tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setenv("FLOWOPD_DATA_DIR", str(tmp_path))
    spec = PromptSetSpec(format="lines", path="x/y.txt", url="http://127.0.0.1:9/y.txt", sha256="0" * 64)
    with pytest.raises(PromptFileError, match=r"x/y\.txt: could not download .*FLOWOPD_DATA_DIR"):
        fetch_prompt_file(spec)


def test_download_goes_to_the_cache_verified(tmp_path, monkeypatch, isolated_cache):
    import hashlib
    import http.server
    import threading

    payload = b"first prompt\nsecond prompt\n"
    (tmp_path / "y.txt").write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("FLOWOPD_DATA_DIR")
        url = f"http://127.0.0.1:{server.server_address[1]}/y.txt"
        spec = PromptSetSpec(format="lines", path="x/y.txt", url=url, sha256=hashlib.sha256(payload).hexdigest())
        path = fetch_prompt_file(spec)
        assert path == isolated_cache / "data" / "x" / "y.txt" and path.read_bytes() == payload
        assert [r["prompt"] for r in load_prompts(spec)] == ["first prompt", "second prompt"]
        bad = PromptSetSpec(format="lines", path="x/z.txt", url=url, sha256="1" * 64)
        with pytest.raises(PromptFileError, match="sha256 mismatch"):
            fetch_prompt_file(bad)
        assert not (isolated_cache / "data" / "x" / "z.txt").exists()
    finally:
        server.shutdown()


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="missing key 'prompts'"):
        parse_spec({"name": "x", "version": "1", "description": "", "scorer": "ocr"}, "x.toml")
    with pytest.raises(ValueError, match=r"x\.toml \[generation\]: unknown key"):
        parse_spec({"name": "x", "version": "1", "description": "", "scorer": "ocr",
                    "prompts": {"format": "lines"}, "generation": {"stpes": 3}}, "x.toml")


def test_corrupt_png_names_the_file(tmp_path):
    good = tmp_path / "good.png"
    save_png(torch.rand(3, 8, 8), good)
    assert load_png(good).shape == (3, 8, 8)
    bad = tmp_path / "00003" / "samples" / "0001.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CorruptImageError, match=r"corrupt image .*00003/samples/0001\.png"):
        load_png(bad)


def test_png_round_trip_is_exact_on_8bit_values(tmp_path):
    img = torch.randint(0, 256, (3, 5, 7)).float() / 255
    save_png(img, tmp_path / "a.png")
    assert torch.equal(load_png(tmp_path / "a.png"), img)


def test_seeds_are_distinct_and_stable():
    seeds = {sample_seed(0, "geneval", i, k) for i in range(50) for k in range(4)}
    assert len(seeds) == 200
    assert sample_seed(0, "geneval", 3, 1) == sample_seed(0, "geneval", 3, 1) != sample_seed(1, "geneval", 3, 1)


def _rows(scores, groups=None, per_prompt=1):
    n = len(scores)
    df = pd.DataFrame({"index": np.arange(n) // per_prompt, "score": scores})
    if groups is not None:
        df["tag"] = groups
    return df


def test_mean_of_tag_means_is_not_the_pooled_mean():
    df = _rows([1, 1, 1, 0], groups=["a", "a", "a", "b"])
    out = aggregate(df, "mean_of_tag_means", "tag")
    assert out["a"].value == 1.0 and out["b"].value == 0.0 and out["mean"].value == 0.5
    assert aggregate(df, "mean")["mean"].value == 0.75


def test_nan_scores_are_excluded_and_counted():
    out = aggregate(_rows([1.0, np.nan, 3.0]), "mean")["mean"]
    assert out.value == 2.0 and out.n == 2


def test_bootstrap_interval_contains_the_value_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = aggregate(_rows(rng.random(20)), "mean")["mean"]
    large = aggregate(_rows(rng.random(2000)), "mean")["mean"]
    assert small.ci_low <= small.value <= small.ci_high
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 4


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_aggregating_concatenated_batches_is_the_size_weighted_mean(a, b):
    whole = aggregate(_rows(a + b), "mean", n_boot=10)["mean"].value
    expect = (np.mean(a) * len(a) + np.mean(b) * len(b)) / (len(a) + len(b))
    assert whole == pytest.approx(expect, abs=1e-9)


def test_scorebatch_concat_and_rows():
    a = ScoreBatch(np.array([1.0]), {"tag": ["x"]})
    b = ScoreBatch(np.array([0.0, np.nan]), {"tag": ["y", "z"], "text": ["p", "q"]})
    c = ScoreBatch.concat([a, b])
    assert len(c) == 3 and c.details["text"] == [None, "p", "q"]
    with pytest.raises(ValueError, match="detail 'tag' has 1 values for 2 scores"):
        ScoreBatch(np.array([1.0, 2.0]), {"tag": ["x"]})


def _results(tmp_path, value):
    from flowopd.bench.results import new_results, save_results

    res = new_results("mini:base")
    res["benchmarks"]["mini-geneval"] = {
        "metrics": {"mean": {"value": value, "ci_low": 0, "ci_high": 1, "stderr": 0.1, "n": 4}}
    }
    save_results(res, tmp_path)
    return tmp_path / "results.json"


def test_check_fails_above_and_passes_below_the_measured_score(tmp_path, capsys):
    path = _results(tmp_path, 0.42)
    thresholds = tmp_path / "t.toml"
    thresholds.write_text('[floors."mini:base"]\n"mini-geneval/mean" = 0.5\n')
    assert main(["check", str(path), "--thresholds", str(thresholds)]) == 1
    assert "mini-geneval/mean: 0.4200 is below its floor 0.5000" in capsys.readouterr().out
    thresholds.write_text('[floors."mini:base"]\n"mini-geneval/mean" = 0.4\n')
    assert main(["check", str(path), "--thresholds", str(thresholds)]) == 0
    thresholds.write_text('[floors.default]\n"mini-ocr/mean" = 0.4\n')
    floors = load_thresholds(thresholds, None, "mini:base")
    assert check_floors(json.loads(path.read_text()), floors) == ["mini-ocr/mean: missing from results (floor 0.4)"]


def test_validation_specs_select_on_train_prompts_never_seen_by_the_test_benchmark(monkeypatch):
    # training/val_benchmarks: where the GPU teachers' checkpoints were chosen (training/configs/mini_grpo_*.toml)
    from flowopd.world.grammar import prompt_set

    monkeypatch.setenv("FLOWOPD_BENCHMARKS_DIR", str(VAL_BENCHMARKS))
    specs = all_specs()
    for task in ("geneval", "ocr"):
        val, test = specs[f"mini-{task}-val"], specs[f"mini-{task}"]
        assert (val.scorer, val.aggregation) == (test.scorer, test.aggregation)
        assert val.prompts.args == {"task": task, "split": "train"}
        assert val.generation.seed != test.generation.seed
        train = {m["prompt"] for m in prompt_set(task, "train")}
        shared = [m for m in prompt_set(task, "test") if m["prompt"] in train]
        if task == "ocr":
            assert not shared
        else:  # docs/mini_world.md: tags too small to split test on training prompts (other seeds); color_attr is split
            assert shared and "color_attr" not in {m["tag"] for m in shared}
    for name in ("mini-quality-val", "mini-pick-val"):  # score mini-geneval-val's images, like their test specs
        owner = specs[specs[name].images_from]
        assert owner.name == "mini-geneval-val" and specs[name].scorer == specs[name.removesuffix("-val")].scorer
        assert (specs[name].prompts, specs[name].generation) == (owner.prompts, owner.generation)
    monkeypatch.delenv("FLOWOPD_BENCHMARKS_DIR")
    assert "mini-geneval-val" not in all_specs()  # not a reported benchmark


def test_images_from_after_a_benchmark_with_other_generation_settings(monkeypatch, tmp_path):
    # regression: evaluate() reused one variable for the caller's generation overrides and for the previous
    # spec's recorded settings, so an images_from benchmark after mini-ocr-val (1 image per prompt) was checked
    # against its owner with the wrong settings and refused
    from flowopd.bench.evaluate import evaluate

    monkeypatch.setenv("FLOWOPD_BENCHMARKS_DIR", str(VAL_BENCHMARKS))
    torch.manual_seed(0)
    res = evaluate("mini:base", ["mini-geneval-val", "mini-ocr-val", "mini-quality-val"], out=tmp_path / "run",
                   limit=2, generation={"steps": 3}, progress=False, log=lambda _: None)
    gen = {name: res["benchmarks"][name]["generation"] for name in res["benchmarks"]}
    assert gen["mini-ocr-val"]["images_per_prompt"] == 1 and gen["mini-quality-val"]["images_per_prompt"] == 4
    assert {g["steps"] for g in gen.values()} == {3}  # the override reaches every spec
    assert res["benchmarks"]["mini-quality-val"]["images"] == res["benchmarks"]["mini-geneval-val"]["images"]
    assert res["benchmarks"]["mini-quality-val"]["n_images"] == 8


def test_more_images_per_prompt_extend_a_cached_image_set(tmp_path):
    from flowopd.bench.evaluate import evaluate

    def run(**generation):
        return evaluate("mini:base", ["mini-ocr"], out=tmp_path / "run", limit=2,
                        generation={"steps": 2, **generation}, progress=False, log=lambda _: None)

    first = run(images_per_prompt=1)["benchmarks"]["mini-ocr"]
    root = Path(first["images"])
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.glob("*/samples/*.png")}
    assert first["n_images"] == 2 and len(kept) == 2
    more = run(images_per_prompt=3)["benchmarks"]["mini-ocr"]
    assert more["n_images"] == 6 and len(list(root.glob("*/samples/*.png"))) == 6
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == v for p, v in kept.items())  # cached, not regenerated
    fresh = evaluate("mini:base", ["mini-ocr"], out=tmp_path / "fresh", limit=2,
                     generation={"steps": 2, "images_per_prompt": 3}, progress=False, log=lambda _: None)
    assert fresh["benchmarks"]["mini-ocr"]["metrics"] == more["metrics"]  # the same images as made in one go
    with pytest.raises(ValueError, match=r"other settings \(steps\)"):
        run(images_per_prompt=3, steps=3)
