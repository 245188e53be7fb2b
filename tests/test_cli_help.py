"""The newcomer's path (issue 19, point 9): every ``--help`` of every entry point works - ``python -m
flowopd.bench``, ``python -m flowopd.paper`` and ``python -m flowopd.train`` and each of their subcommands, the
diagnostics - prints its usage and exits 0, in this process (fast) and for the entry points as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.bench.cli import build_parser
from flowopd.bench.cli import main as bench_main
from flowopd.paper.__main__ import build_parser as build_paper_parser
from flowopd.paper.__main__ import main as paper_main
from flowopd.train.__main__ import COMMANDS
from flowopd.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[1]
BENCH_COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # every registered subcommand
PAPER_COMMANDS = sorted(build_paper_parser()._subparsers._group_actions[0].choices)


def test_the_bench_subcommands_are_the_documented_ones():
    assert set(BENCH_COMMANDS) == {"list", "evaluate", "report", "compare", "check", "serve"}
    assert set(PAPER_COMMANDS) == {"table", "seesaw"}  # moved from python -m flowopd.bench (issue 21)


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in BENCH_COMMANDS]])
def test_bench_help(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        bench_main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 0 and "Traceback" not in err
    assert out.startswith("usage: python -m flowopd.bench") and len(out.splitlines()) >= 3


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in PAPER_COMMANDS]])
def test_paper_help(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        paper_main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 0 and "Traceback" not in err
    assert out.startswith("usage: python -m flowopd.paper") and len(out.splitlines()) >= 3


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in sorted(COMMANDS)]])
def test_train_help(capsys, argv):
    try:
        code = train_main(argv)
    except SystemExit as stop:  # argparse-based subcommands exit from --help
        code = stop.code
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert out.startswith("usage: python -m flowopd.train"), out[:200]


def test_diagnostics_help(capsys):
    from flowopd.train.diagnostics import main as diagnostics_main

    with pytest.raises(SystemExit) as stop:
        diagnostics_main(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m flowopd.train.diagnostics")


@pytest.mark.parametrize("module", ["flowopd.bench", "flowopd.paper", "flowopd.train"])
def test_help_as_a_subprocess(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m {module}") and not proc.stderr
