"""Bad input to ``python -m flowopd.paper`` (issue 21: the table and seesaw commands moved out of ``python -m
flowopd.bench``): every case runs the real entry point and asserts a non-zero exit, a clear one- or two-line
message naming what is wrong, and no traceback. Classes: CLI numbers and flags, the SD3.5-M checkpoint list
(found by flag, environment variable or the project directory, never the working directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.bench.report import load_table
from flowopd.paper import checkpoints
from flowopd.paper.__main__ import main
from flowopd.paper.checkpoints import ENV, MissingCheckpointsError, checkpoint_list_path
from flowopd.paper.tables import resolve_rows

REPO = Path(__file__).resolve().parents[1]
PROJECT_LIST = REPO / "reports" / "sd35m_checkpoints.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``python -m flowopd.paper ARGV`` run in this process."""
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


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the project holding a decoy reports/sd35m_checkpoints.toml; no variable set."""
    monkeypatch.delenv(ENV, raising=False)
    cwd = tmp_path / "cwd"
    (cwd / "reports").mkdir(parents=True)
    (cwd / "reports" / "sd35m_checkpoints.toml").write_text('[checkpoints]\n"SD3.5-M (base)" = "/decoy/base"\n')
    monkeypatch.chdir(cwd)
    return cwd


# ---------------------------------------------------------------- CLI numbers and flags (moved from bench)

@pytest.mark.parametrize(("argv", "needles"), [
    (["table", "table1", "--limit", "0"], ["--limit", "integer >= 1"]),
    (["table", "table1", "--preset", "huge"], ["--preset", "'huge'"]),
    (["seesaw", "--log-level", "loud"], ["--log-level", "'LOUD'"]),
    (["tabel"], ["invalid choice", "'tabel'"]),
    ([], ["required", "command"]),
])
def test_bad_cli_numbers_and_flags_are_refused_when_parsed(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_clear(code, err, *needles)
    assert "--help" in err  # the second line says where the help is


@pytest.mark.parametrize(("argv", "needles"), [
    (["table", "tabel1"], ["unknown table 'tabel1'", "table1"]),
    (["seesaw", "--device", "cdua"], ["--device 'cdua'"]),
    (["table", "table1", "--device", "cdua"], ["--device 'cdua'", "not a device"]),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_clear(code, err, *needles)


# ---------------------------------------------------------------- the SD3.5-M checkpoint list

def test_the_list_is_the_projects_whatever_the_working_directory(elsewhere):
    assert checkpoint_list_path() == (PROJECT_LIST, "")
    with pytest.raises(MissingCheckpointsError) as err:  # the project's list sets no row but the base
        resolve_rows(load_table("table1"), "sd35m")
    assert str(PROJECT_LIST) in str(err.value) and "/decoy/base" not in str(err.value)


def test_the_list_from_another_directory_as_a_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.run([sys.executable, "-m", "flowopd.paper", "table", "table1", "--preset", "sd35m"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing checkpoints" in proc.stderr and f"in {PROJECT_LIST}" in proc.stderr


def test_the_environment_variable_names_the_list(elsewhere, monkeypatch, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('[checkpoints]\n"+ GRPO-OCR" = "/mine/ocr"\n')
    monkeypatch.setenv(ENV, str(mine))
    assert checkpoint_list_path() == (mine, ENV)
    assert checkpoint_list_path(tmp_path / "flag.toml") == (tmp_path / "flag.toml", "--config")  # the flag first
    with pytest.raises(MissingCheckpointsError) as err:
        resolve_rows(load_table("table1"), "sd35m")
    assert "/mine/ocr" in str(err.value) and str(mine) in str(err.value)


def test_a_missing_list_is_refused_naming_the_flag(capsys, elsewhere, tmp_path):
    absent = tmp_path / "absent.toml"
    code, _, err = run(capsys, "table", "table1", "--preset", "sd35m", "--config", str(absent))
    assert_clear(code, err, f"--config {absent}: no such file", "copy reports/sd35m_checkpoints.toml")
    code, _, err = run(capsys, "seesaw", "--preset", "sd35m", "--config", str(absent))
    assert_clear(code, err, f"--config {absent}: no such file", "[seesaw] table")


def test_a_missing_list_is_refused_naming_the_variable(capsys, elsewhere, monkeypatch, tmp_path):
    absent = tmp_path / "absent.toml"
    monkeypatch.setenv(ENV, str(absent))
    code, _, err = run(capsys, "table", "table2", "--preset", "sd35m")
    assert_clear(code, err, f"{ENV}={absent}: no such file")


@pytest.mark.parametrize(("text", "needles"), [
    ("[checkpoints\n", ["invalid TOML"]),
    ('checkpoints = "x"\n', ["[checkpoints] must be a table"]),
    ('[checkpoints]\n"+ GRPO-OCR" = 3\n', ["'+ GRPO-OCR' must be a path or hub id in quotes", "3"]),
])
def test_a_broken_list_is_refused_naming_the_file(capsys, elsewhere, tmp_path, text, needles):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    code, _, err = run(capsys, "table", "table1", "--preset", "sd35m", "--config", str(bad))
    assert_clear(code, err, str(bad), *needles)


def test_an_installed_wheel_names_the_template_to_copy(elsewhere, monkeypatch, tmp_path):
    site = tmp_path / "site-packages" / "flowopd"  # no project directory around the package
    (site / "_data").mkdir(parents=True)
    monkeypatch.setattr(checkpoints, "PACKAGE", site)
    assert checkpoints.project_root() is None
    assert checkpoints.template() == site / "_data" / "sd35m_checkpoints.toml"
    with pytest.raises(MissingCheckpointsError) as err:
        checkpoint_list_path()
    text = str(err.value)
    assert str(site / "_data" / "sd35m_checkpoints.toml") in text and "--config" in text and ENV in text
    monkeypatch.setenv(ENV, str(tmp_path / "mine.toml"))
    assert checkpoint_list_path() == (tmp_path / "mine.toml", ENV)


def test_the_help_names_where_the_list_is_found(capsys):
    for command in ("table", "seesaw"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert f"${ENV}" in out and "reports/sd35m_checkpoints.toml" in out
