"""nox sessions: tests (default), lint, slow checks, mini pretraining, isolated scorer servers.

CPU machines: every session installs the CPU build of torch first (see README).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
DATA = str((ROOT.parent / "shared" / "data").resolve())


def _install(session: nox.Session, extras: str = "dev,ocr,judge") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


def _env() -> dict[str, str]:
    import os

    return {"FLOWOPD_DATA_DIR": os.environ.get("FLOWOPD_DATA_DIR", DATA)}


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite (the same command as the README and CI)."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs, env=_env())


@nox.session
def slow(session: nox.Session) -> None:
    """Checks too slow for the default run (pytest -m slow)."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", "-m", "slow", *session.posargs, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "flowopd", "tests", "noxfile.py")


def _scorer_envs():
    # loaded by path: envs.py imports only the standard library, so nox needs no torch
    spec = importlib.util.spec_from_file_location("flowopd_envs", ROOT / "flowopd" / "scorers" / "envs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ENVS = _scorer_envs()


@nox.session(python=_ENVS.SERVE_PYTHON)
@nox.parametrize("scorer", sorted(_ENVS.SCORER_ENVS))
def serve(session: nox.Session, scorer: str) -> None:
    """A scorer with a conflicting stack, in its own pinned environment, behind the scorer server."""
    _ENVS.serve_session(session, scorer)
