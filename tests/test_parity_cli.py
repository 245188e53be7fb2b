"""The parity tooling's own arguments (nox -s parity, tests/parity/run.py) and the official-engine environments;
the parity checks themselves need the official packages and run in `nox -s parity` only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.scorers.envs import PARITY_ENVS, PARITY_SIDES, SCORER_ENVS, parse_parity_args, server_command
from flowopd.scorers.official import OFFICIAL

RUN = Path(__file__).resolve().parent / "parity" / "run.py"


def test_parity_args_parse_and_bad_ones_are_refused_by_name():
    assert parse_parity_args(["--only", "hps,ocr", "--full", "--work", "/tmp/x"]) == {
        "only": "hps,ocr", "work": "/tmp/x", "full": True}
    with pytest.raises(ValueError, match="unknown argument '--fast'"):
        parse_parity_args(["--fast"])
    with pytest.raises(ValueError, match="--only needs a value"):
        parse_parity_args(["--only"])


def test_parity_sides_run_in_declared_environments():
    assert {where for _, where in PARITY_SIDES if where} <= set(PARITY_ENVS)
    assert [side for side, _ in PARITY_SIDES][-1] == "compare"


def test_run_refuses_unknown_checks_and_reports_what_was_not_run(tmp_path):
    bad = subprocess.run([sys.executable, str(RUN), "compare", str(tmp_path), "--only", "hps,nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--only: unknown check(s) ['nope']" in bad.stderr
    empty = subprocess.run([sys.executable, str(RUN), "compare", str(tmp_path), "--only", "hps"],
                           capture_output=True, text=True)
    assert empty.returncode == 1  # nothing compared is a failure, with the reason in the table
    assert "not run: official-torch, ours" in empty.stdout


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_engine_environments_serve_on_the_clients_port(name):
    env = SCORER_ENVS[f"{name}-official"]
    assert env.options == {"engine": "official"} and env.port == OFFICIAL[name][0]
    command = server_command(f"{name}-official")
    assert command[command.index("--port") + 1] == str(OFFICIAL[name][0])
