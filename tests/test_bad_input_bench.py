"""Bad input to ``python -m flowopd.bench`` (issue 19): every case runs the real entry point (``main([...])``, a few
as a subprocess) and asserts a non-zero exit, a clear one- or two-line message naming what is wrong, and no
traceback. Classes: CLI numbers and flags, evaluate, ``--images`` matching, cache identity, benchmark specs,
report, check, list, compare, serve, the error boundary. docs/reliability.md counts them."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.bench.cli import main
from flowopd.bench.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
FAST = {"steps": 2}


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers():
    """Handlers made during a test write to its captured stderr, closed after it (``serve`` configures logging;
    transformers and diffusers add their handler on first import): later tests must not log into that stream."""
    loggers = [logging.getLogger(name) for name in ("", "transformers", "diffusers")]
    before = [(lg.handlers[:], lg.level) for lg in loggers]
    yield
    for lg, (handlers, level) in zip(loggers, before):
        for handler in lg.handlers[:]:
            if handler not in handlers:
                lg.removeHandler(handler)
        lg.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``python -m flowopd.bench ARGV`` run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear(code: int, err: str, *needles: str) -> None:
    """A non-zero exit, one or two lines (warnings aside), no traceback, and every needle in the message."""
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert 1 <= len(lines) <= 2, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of mini:base: 3 mini-ocr prompts and 2 mini-geneval prompts, 2 sampling steps (a few seconds)."""
    out = tmp_path_factory.mktemp("made") / "run"
    evaluate("mini:base", ["mini-ocr"], out=out, limit=3, generation=FAST, progress=False, log=lambda _: None)
    evaluate("mini:base", ["mini-geneval"], out=out / "geneval", limit=2, generation=FAST, progress=False,
             log=lambda _: None)
    return out


def copy_images(made: Path, tmp_path: Path, bench: str = "mini-ocr") -> Path:
    src = made / "images" / bench if bench == "mini-ocr" else made / "geneval" / "images" / bench
    return Path(shutil.copytree(src, tmp_path / "ext"))


# ---------------------------------------------------------------- CLI numbers and flags (checked when parsed)

@pytest.mark.parametrize(("argv", "needles"), [
    (["evaluate", "--limit", "-3"], ["--limit", "integer >= 1", "'-3'"]),
    (["evaluate", "--limit", "0"], ["--limit", "integer >= 1"]),
    (["evaluate", "--limit", "abc"], ["--limit", "'abc'"]),
    (["evaluate", "--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    (["evaluate", "--steps", "0"], ["--steps", "integer >= 1"]),
    (["evaluate", "--resolution", "-64"], ["--resolution", "integer >= 1"]),
    (["evaluate", "--guidance-scale", "nan"], ["--guidance-scale", "finite number >= 0"]),
    (["evaluate", "--guidance-scale", "-1"], ["--guidance-scale", "finite number >= 0"]),
    (["evaluate", "--images-per-prompt", "0"], ["--images-per-prompt", "integer >= 1"]),
    (["compare", "a", "b", "--n-boot", "0"], ["--n-boot", "integer >= 1"]),
    (["report", "x", "--scale", "huge"], ["--scale", "'huge'"]),
    (["evaluat"], ["invalid choice", "'evaluat'"]),
    ([], ["required", "command"]),
])
def test_bad_cli_numbers_and_flags_are_refused_when_parsed(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_clear(code, err, *needles)
    assert "--help" in err  # the second line says where the help is


@pytest.mark.parametrize(("argv", "needles"), [
    (["evaluate", "--device", "cdua"], ["--device 'cdua'", "not a device"]),
    (["evaluate", "--benchmarks", ",,"], ["--benchmarks", "no names"]),
    (["evaluate", "--benchmarks", "genevl"], ["genevl", "did you mean 'geneval'"]),
    (["evaluate", "--scorer-url", "mini-ocr"], ["--scorer-url", "BENCHMARK=http"]),
    (["evaluate", "--scorer-url", "mini-ocr=ftp://x"], ["--scorer-url", "'mini-ocr=ftp://x'"]),
    (["evaluate", "--positional"], ["--positional", "--images"]),
    (["evaluate", "mini:base", "--images", "."], ["--images", "no CHECKPOINT"]),
    (["evaluate", "mini:base", "--base", "mini:base", "--limit", "1"], ["--base", "LoRA adapter"]),
    (["evaluate", "./no/such/model", "--benchmarks", "mini-ocr"], ["./no/such/model"]),
    (["evaluate", "mini:no-such-model", "--benchmarks", "mini-ocr"], ["no-such-model"]),
    (["table", "table1"], ["moved", "python -m flowopd.paper table"]),
    (["seesaw", "--device", "cdua"], ["moved", "python -m flowopd.paper seesaw"]),
])
def test_bad_evaluate_arguments_are_one_line_errors(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_clear(code, err, *needles)


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = run(capsys, "evaluate", "--benchmarks", "mini-ocr", "--limit", "1", "--out", str(tmp_path / "f"))
    assert_clear(code, err, f"--out {tmp_path / 'f'}", "a file")


# ---------------------------------------------------------------- --images: matched by metadata, never by position

def test_images_dir_that_does_not_exist(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--images", str(tmp_path / "nope"), "--benchmarks", "mini-ocr")
    assert_clear(code, err, "nope", "no such directory")


def test_images_dir_without_images(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--images", str(tmp_path), "--benchmarks", "mini-ocr")
    assert_clear(code, err, "no images found", "metadata.jsonl")


def test_images_folder_without_metadata_is_refused_unless_positional(capsys, made, tmp_path):
    ext = copy_images(made, tmp_path)
    (ext / "00001" / "metadata.jsonl").unlink()
    args = ["evaluate", "--images", str(ext), "--benchmarks", "mini-ocr", "--limit", "3", "--no-progress"]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "a"))
    assert_clear(code, err, "00001/metadata.jsonl: missing", "--positional")
    code, out, _ = run(capsys, *args, "--out", str(tmp_path / "b"), "--positional")
    assert code == 0 and "| mini-ocr" in out


def test_images_of_another_benchmark_are_refused_naming_the_prompt(capsys, made, tmp_path):
    ext = copy_images(made, tmp_path)  # mini-ocr images offered as mini-geneval's
    code, _, err = run(capsys, "evaluate", "--images", str(ext), "--benchmarks", "mini-geneval", "--out",
                       str(tmp_path / "o"))
    assert_clear(code, err, "00000/metadata.jsonl", "is not a prompt of mini-geneval")


def test_images_whose_metadata_field_disagrees_are_refused_naming_the_field(capsys, made, tmp_path):
    ext = copy_images(made, tmp_path, "mini-geneval")
    meta = json.loads((ext / "00001" / "metadata.jsonl").read_text())
    (ext / "00001" / "metadata.jsonl").write_text(json.dumps({**meta, "tag": "counting"}) + "\n")
    code, _, err = run(capsys, "evaluate", "--images", str(ext), "--benchmarks", "mini-geneval", "--out",
                       str(tmp_path / "o"))
    assert_clear(code, err, "00001/metadata.jsonl", "field 'tag'", "counting", "single_object")


def test_two_folders_of_one_prompt_are_refused(capsys, made, tmp_path):
    ext = copy_images(made, tmp_path)
    shutil.copy(ext / "00000" / "metadata.jsonl", ext / "00002" / "metadata.jsonl")
    code, _, err = run(capsys, "evaluate", "--images", str(ext), "--benchmarks", "mini-ocr", "--out",
                       str(tmp_path / "o"))
    assert_clear(code, err, "a second folder for prompt 0")


def test_loose_png_files_have_no_metadata_and_need_positional(capsys, made, tmp_path):
    ext = tmp_path / "pngs"
    ext.mkdir()
    for i in range(3):
        shutil.copy(made / "images" / "mini-ocr" / f"{i:05d}" / "samples" / "0000.png", ext / f"{i}.png")
    code, _, err = run(capsys, "evaluate", "--images", str(ext), "--benchmarks", "mini-ocr", "--out",
                       str(tmp_path / "o"))
    assert_clear(code, err, "0.png: no metadata.jsonl", "--positional")


def test_reordered_image_folders_are_scored_against_their_own_prompts(made, tmp_path):
    # the silent wrong result of issue 19: folders in another order were scored against the wrong prompts
    ext = copy_images(made, tmp_path)
    (ext / "00000").rename(ext / "tmp")
    (ext / "00002").rename(ext / "00000")
    (ext / "tmp").rename(ext / "00002")
    kw = {"benchmarks": ["mini-ocr"], "limit": 3, "progress": False, "log": lambda _: None}
    matched = evaluate(images=ext, out=tmp_path / "m", **kw)["benchmarks"]["mini-ocr"]
    original = json.loads((made / "results.json").read_text())["benchmarks"]["mini-ocr"]
    assert matched["metrics"] == original["metrics"] and matched["image_matching"] == "metadata"
    rows = __import__("pandas").read_parquet(tmp_path / "m" / "scores" / "mini-ocr.parquet")
    folder = rows.groupby("index")["file"].first().str.extract(r"(\d{5})/samples")[0]
    assert list(folder) == ["00002", "00001", "00000"]  # prompt 0's images now lie in folder 00002


def test_corrupt_external_image_names_the_file(capsys, made, tmp_path):
    ext = copy_images(made, tmp_path)
    (ext / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG broken")
    code, _, err = run(capsys, "evaluate", "--images", str(ext), "--benchmarks", "mini-ocr", "--limit", "3",
                       "--out", str(tmp_path / "o"), "--no-progress")
    assert_clear(code, err, "corrupt image", "00001/samples/0000.png")


# ---------------------------------------------------------------- what is scored: identity of images and scores

def test_images_of_another_checkpoint_are_refused_naming_both(capsys, made, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made / "images", out / "images")
    code, _, err = run(capsys, "evaluate", "mini:grpo-mix", "--benchmarks", "mini-ocr", "--limit", "3", "--steps",
                       "2", "--out", str(out), "--no-progress")
    assert_clear(code, err, "by mini:base", "not by mini:grpo-mix", "identity", "new --out directory")
    assert "delete" in err and "--images" not in err  # no advice that reuses the images under another label


def test_images_made_with_other_settings_are_refused_naming_the_setting(capsys, made, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made / "images", out / "images")
    code, _, err = run(capsys, "evaluate", "mini:base", "--benchmarks", "mini-ocr", "--limit", "3", "--steps", "3",
                       "--out", str(out), "--no-progress")
    assert_clear(code, err, "other settings (steps)", "steps: 2 -> 3")


def test_image_set_without_a_recorded_identity_is_refused(capsys, made, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made / "images", out / "images")
    record = json.loads((out / "images" / "mini-ocr" / "generation.json").read_text())
    legacy = {"checkpoint": "mini:base", "image_set": "mini-ocr", **record["generation"]}  # the old flat record
    (out / "images" / "mini-ocr" / "generation.json").write_text(json.dumps(legacy))
    code, _, err = run(capsys, "evaluate", "mini:base", "--benchmarks", "mini-ocr", "--limit", "3", "--steps", "2",
                       "--out", str(out), "--no-progress")
    assert_clear(code, err, "no checkpoint identity", "cannot be attributed to mini:base")


def test_scores_cached_for_other_images_are_never_reused(made, tmp_path):
    # the silent wrong result of issue 19: deleting the images (as an old error advised) and generating another
    # model's kept the first model's parquet of scores
    out = tmp_path / "run"
    shutil.copytree(made, out, ignore=shutil.ignore_patterns("geneval"))
    shutil.rmtree(out / "images")
    logs: list[str] = []
    res = evaluate("mini:grpo-pick", ["mini-ocr"], out=out, limit=3, generation=FAST, progress=False,
                   log=logs.append)
    assert any("scoring again" in m and "not of these images" in m for m in logs)
    rows = __import__("pandas").read_parquet(out / "scores" / "mini-ocr.parquet")
    assert rows["score"].mean() == pytest.approx(res["metrics"]["mini-ocr/mean"])
    assert res["checkpoint"] == "mini:grpo-pick" and set(res["benchmarks"]) == {"mini-ocr"}


def test_generation_override_out_of_range_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"mini-ocr: generation override: steps must be an integer >= 1, got 0"):
        evaluate("mini:base", ["mini-ocr"], out="/nonexistent/never", generation={"steps": 0})
    with pytest.raises(ValueError, match=r"generation override: unknown key 'stpes'; did you mean 'steps'"):
        evaluate("mini:base", ["mini-ocr"], out="/nonexistent/never", generation={"stpes": 2})
    with pytest.raises(ValueError, match=r"limit must be an integer >= 1 \(or None\), got -3"):
        evaluate("mini:base", ["mini-ocr"], limit=-3)


def test_unpinned_prompt_file_warns_and_its_hash_is_recorded(tmp_path, monkeypatch, isolated_cache):
    import hashlib

    from flowopd.data import UnpinnedPromptSetWarning

    data, specs = tmp_path / "data", tmp_path / "specs"
    (data / "u").mkdir(parents=True)
    (data / "u" / "p.txt").write_text('a sign that says "AB"\na sign that says "CD"\n')
    specs.mkdir()
    (specs / "u.toml").write_text(spec_text(prompts='format = "lines"\npath = "u/p.txt"', images_per_prompt=1))
    monkeypatch.setenv("FLOWOPD_DATA_DIR", str(data))
    monkeypatch.setenv("FLOWOPD_BENCHMARKS_DIR", str(specs))
    with pytest.warns(UnpinnedPromptSetWarning, match=r"prompt set u/p\.txt is unpinned .*sha256 [0-9a-f]{64}"):
        res = evaluate("mini:base", ["bad-spec"], out=tmp_path / "run", generation=FAST, progress=False,
                       log=lambda _: None)
    entry = res["benchmarks"]["bad-spec"]
    assert entry["prompts_pinned"] is False and entry["n_prompts_total"] == 2
    assert len(entry["prompts_sha256"]) == 64 and entry["prompts_sha256"] != hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- benchmark specs: data, checked when loaded

def spec_text(prompts: str = 'format = "python"\nloader = "mini-world"\nargs = { task = "ocr", split = "test" }',
              generation: str = "", images_per_prompt: int = 1, **top: str | None) -> str:
    """A valid mini-ocr-like spec named bad-spec, with ``top`` keys replaced (TOML literals; None drops one) and
    ``generation`` ("key = value") replacing or adding a [generation] setting."""
    fields = {"name": '"bad-spec"', "version": '"1"', "description": '"a test spec"', "scale_name": '"mini"',
              "scorer": '"mini-ocr"', "aggregation": '"mean"', "scale": "[0.0, 1.0]", **top}
    head = "\n".join(f"{k} = {v}" for k, v in fields.items() if v is not None)
    gen = {"images_per_prompt": str(images_per_prompt), "height": "32", "width": "32", "steps": "2"}
    if generation:
        key, _, value = generation.partition(" = ")
        gen[key] = value
    body = "\n".join(f"{k} = {v}" for k, v in gen.items())
    return f"{head}\n\n[prompts]\n{prompts}\n\n[generation]\n{body}\n"


MARKER = "flowopd_never_imported_marker"


@pytest.mark.parametrize(("text", "needles"), [
    (spec_text(prompts=f'format = "python"\nloader = "{MARKER}:boom"'),
     ["[prompts]: loader", "unknown prompt loader", "registered loaders only"]),
    (spec_text(prompts='format = "python"\nloader = "os:system"\nargs = { command = "true" }'),
     ["unknown prompt loader 'os:system'"]),
    (spec_text(scorer=f'"{MARKER}:Scorer"'), ["scorer: unknown scorer", "registered scorers only"]),
    (spec_text(scorr='"mini-ocr"'), ["unknown key 'scorr'", "did you mean 'scorer'"]),
    (spec_text(generation="stpes = 3"), ["[generation]: unknown key 'stpes'", "did you mean 'steps'"]),
    (spec_text(generation="seed = -1"), ["[generation]: seed must be an integer >= 0, got -1"]),
    (spec_text(images_per_prompt=0), ["images_per_prompt must be an integer >= 1, got 0"]),
    (spec_text(generation='guidance_scale = "4.5"'), ["guidance_scale must be a number, got '4.5'"]),
    (spec_text(generation="guidance_scale = nan"), ["guidance_scale must be a finite number >= 0"]),
    (spec_text(scale="[1.0, 0.0]"), ["scale must be [low, high] with low < high"]),
    (spec_text(scale='["a", "b"]'), ["scale must be a list of numbers"]),
    (spec_text(version="2"), ["version must be a string, got 2"]),
    (spec_text(name='"../evil"'), ["name must be letters", "'../evil'"]),
    (spec_text(aggregation='"median"'), ["aggregation must be one of mean, mean_of_tag_means, per_category"]),
    (spec_text(aggregation='"per_category"'), ["needs group_by"]),
    (spec_text(scale_name='"large"'), ["scale_name must be one of mini, sd35m"]),
    (spec_text(higher_is_better='"yes"'), ["higher_is_better must be true or false"]),
    (spec_text(weights='"org/model"'), ["weights must be a list of strings"]),
    (spec_text(images_from='"mini-genevl"'), ["images_from = 'mini-genevl' is not a benchmark",
                                               "did you mean 'mini-geneval'"]),
    (spec_text(images_from='"mini-geneval"'), ["images_from = 'mini-geneval'", "differ"]),
    (spec_text(prompts='format = "lines"\npath = "../../etc/passwd"'), ["path must be a relative path"]),
    (spec_text(prompts='format = "lines"\npath = "a.txt"\nsha256 = "abc"'), ["sha256 must be 64 lowercase hex"]),
    (spec_text(prompts='format = "lines"\npath = "a.txt"\nurl = "file:///etc/passwd"'), ["url must be an http(s) URL"]),
    (spec_text(prompts='format = "csv"\npath = "a.csv"'), ["format must be one of jsonl, lines, python"]),
    (spec_text(prompts='format = "lines"\npath = "a.txt"\nloader = "mini-world"'), ["loader and args are for"]),
    (spec_text(description=None), ["missing key 'description'"]),
    (spec_text(prompts='format = "python"\nloader = "mini-world"\nargs = { task = "ocr", split = "test" }\n\n'
                       '[scorer_options]\ntrust_remote_code = true'), ["scorer_options.trust_remote_code",
                                                                     "--trust-remote-code"]),
    ("name = [unclosed\n", ["invalid TOML"]),
])
def test_bad_spec_is_refused_when_loaded_naming_file_and_field(capsys, tmp_path, monkeypatch, text, needles):
    (tmp_path / "bad.toml").write_text(text)
    monkeypatch.setenv("FLOWOPD_BENCHMARKS_DIR", str(tmp_path))
    code, _, err = run(capsys, "list")
    assert_clear(code, err, "bad.toml", *needles)
    assert MARKER not in sys.modules  # nothing the spec names was imported


# ---------------------------------------------------------------- report

def test_report_of_a_missing_run(capsys, tmp_path):
    code, _, err = run(capsys, "report", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert_clear(code, err, "nope", "no results.json")


def test_report_with_an_unknown_table(capsys, made, tmp_path):
    code, _, err = run(capsys, "report", str(made), "--table", "tabel1", "--out", str(tmp_path / "r"))
    assert_clear(code, err, "unknown table 'tabel1'")


def test_report_runs_out_of_the_tables_row_order_are_refused(capsys, tmp_path):
    # the runs are placed by position: a swapped pair would print each model's numbers under the other's name
    code, _, err = run(capsys, "report", str(REPO / "reports/mini/grpo-geneval"), str(REPO / "reports/mini/base"),
                       "--table", "table1", "--out", str(tmp_path / "r"))
    assert_clear(code, err, "row 'SD3.5-M (base)' is mini:base", "is mini:grpo-geneval", "row order")


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "not valid JSON"),
    ('{"schema": 99, "checkpoint": "x", "benchmarks": {}}', "results schema 99"),
])
def test_report_of_a_broken_results_file(capsys, tmp_path, content, needle):
    (tmp_path / "results.json").write_text(content)
    code, _, err = run(capsys, "report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert_clear(code, err, "results.json", needle)


def test_partial_run_is_labelled_partial_in_every_table(capsys, made, tmp_path):
    code, out, _ = run(capsys, "report", str(made), "--out", str(tmp_path / "r"))
    assert code == 0 and "(partial 3/32)" in out and "partial: the benchmark was run on fewer prompts" in out
    assert "mini-ocr (partial: 3 of 32 prompts)" in out  # the per-run summary too
    html = (tmp_path / "r" / "report.html").read_text()
    assert "(partial 3/32)" in html
    csv = __import__("pandas").read_csv(tmp_path / "r" / "report.csv")
    assert csv["partial"].all() and set(csv["n_prompts_total"]) == {32}
    code, out, _ = run(capsys, "compare", str(made), str(made), "--n-boot", "20")
    assert code == 0 and "A mini-ocr: partial: 3 of 32 prompts" in out and "B mini-ocr: partial" in out
    code, out, _ = run(capsys, "evaluate", "mini:base", "--benchmarks", "mini-ocr", "--limit", "3", "--steps", "2",
                       "--out", str(made), "--no-progress")  # all cached: the printed table says partial too
    assert code == 0 and "| mini-ocr (partial: 3 of 32 prompts) | mean |" in out


# ---------------------------------------------------------------- check

def write_floors(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(body)
    return path


def test_check_fails_a_partial_run_unless_allowed(capsys, made, tmp_path):
    floors = write_floors(tmp_path, '[floors.default]\n"mini-ocr/mean" = 0.0\n')
    code, out, _ = run(capsys, "check", str(made), "--thresholds", str(floors))
    assert code == 1 and "mini-ocr: partial: 3 of 32 prompts" in out and "--allow-partial" in out
    code, out, _ = run(capsys, "check", str(made), "--thresholds", str(floors), "--allow-partial")
    assert code == 0 and out.startswith("ok:")


@pytest.mark.parametrize(("body", "needles"), [
    (None, ["thresholds file not found"]),
    ("[floors\n", ["invalid TOML"]),
    ('[floors.default]\n"mini-ocr/mean" = "high"\n', ["'mini-ocr/mean' must be a finite number, got 'high'"]),
    ('[floors.other]\n"mini-ocr/mean" = 0.1\n', ["no [floors.'default'] section", "other"]),
])
def test_check_with_a_bad_thresholds_file(capsys, made, tmp_path, body, needles):
    path = write_floors(tmp_path, body) if body is not None else tmp_path / "absent.toml"
    code, _, err = run(capsys, "check", str(made), "--thresholds", str(path), "--allow-partial")
    assert_clear(code, err, path.name, *needles)


# ---------------------------------------------------------------- list

def test_list_without_data_says_how_to_get_it(capsys, tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setenv("FLOWOPD_DATA_DIR", str(tmp_path))  # an empty copy, an empty cache, and no network
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code, out, _ = run(capsys, "list")
    assert code == 0 and "not cached" in out
    assert "FLOWOPD_DATA_DIR" in out and "README's Data section" in out and "list -v" in out


# ---------------------------------------------------------------- compare

def test_compare_with_a_missing_run(capsys, made, tmp_path):
    code, _, err = run(capsys, "compare", str(made), str(tmp_path / "nope"))
    assert_clear(code, err, "nope", "no results.json")


def test_compare_runs_of_different_limits_is_refused(capsys, made):
    code, _, err = run(capsys, "compare", str(made), str(REPO / "reports/mini/base"))
    assert_clear(code, err, "limit", "same prompts")


@pytest.mark.parametrize(("argv", "needles"), [
    (["--combined", "table1:huge"], ["--combined table1:huge", "mini or sd35m"]),
    (["--benchmarks", ","], ["--benchmarks", "no names"]),
])
def test_compare_bad_flags(capsys, made, argv, needles):
    code, _, err = run(capsys, "compare", str(made), str(made), *argv)
    assert_clear(code, err, *needles)


def test_compare_without_runs(capsys):
    code, _, err = run(capsys, "compare", ",", ",")
    assert_clear(code, err, "at least one run")


# ---------------------------------------------------------------- serve (its arguments, through the bench CLI)

@pytest.mark.parametrize(("argv", "needles"), [
    (["serve", "no-such-scorer"], ["unknown scorer 'no-such-scorer'"]),
    (["serve", "mini-ocr", "--port", "abc"], ["--port", "'abc'"]),
    (["serve"], ["required", "scorer"]),
    (["serve", "mini-ocr", "--option", "novalue"], ["--option", "key=value"]),
])
def test_serve_bad_arguments(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_clear(code, err, *needles)


# ---------------------------------------------------------------- the error boundary

def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_debug(capsys, monkeypatch):
    import flowopd.bench.cli as cli

    def broken(_args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_list", broken)
    code, _, err = run(capsys, "list")
    assert_clear(code, err, "internal error (ZeroDivisionError", "FLOWOPD_DEBUG=1")
    monkeypatch.setenv("FLOWOPD_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["list"])


def test_entry_point_as_a_subprocess_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowopd.bench", "check", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no results.json "
                                                f"(run `python -m flowopd.bench evaluate` first)"]


def test_spec_error_through_a_subprocess_names_the_file(tmp_path):
    (tmp_path / "bad.toml").write_text(spec_text(generation="steps = 0"))
    env = {**__import__("os").environ, "FLOWOPD_BENCHMARKS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flowopd.bench", "evaluate", "--benchmarks", "mini-ocr"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'bad.toml'} [generation]: steps must be an integer >= 1, got 0"
