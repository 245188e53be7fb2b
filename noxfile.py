"""nox sessions: tests (default), lint, slow checks, multi-process checks, mini pretraining, isolated scorer servers.

CPU machines: every session installs the CPU build of torch first (see README).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True  # the table sessions re-run in seconds once installed

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
def multiprocess(session: nox.Session) -> None:
    """Several CPU processes under torchrun (gloo): the slow 2-process GRPO, OPD and SFT tests (same adapter as one
    process) and the 2-process evaluation tests (same rows as one process; a killed run resumed by one process)."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", "-m", "slow", "-k", "two_cpu_processes", "tests/test_grpo.py",
                "tests/test_opd.py", "tests/test_sft.py", *session.posargs, env=_env())
    session.run("python", "-m", "pytest", "-q", "tests/test_evaluate_distributed.py", *session.posargs, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    # every Python file the project ships: flowopd, tests, benchmarks, reports' scripts, this file
    # (ruff skips what .gitignore names: runs/, reports/out/, the environments)
    session.run("ruff", "check", ".")


def _table(session: nox.Session, name: str) -> None:
    """``nox -s NAME -- [--preset mini|sd35m] [--retrain] [--config FILE]``: print the table beside the paper's."""
    session.log(f"{name}: installing torch and flowopd into the session's environment (minutes the first time)")
    _install(session)
    session.log(f"{name}: evaluating each row (progress per row below); "
                f"the report goes to reports/out/{name}/ unless --out")
    session.run("python", "-m", "flowopd.paper", "table", name, *session.posargs, env=_env())


@nox.session
def table1(session: nox.Session) -> None:
    """Table 1: base, the four teachers, GRPO-Mix, SFT-init and merge-init Flow-OPD."""
    _table(session, "table1")


@nox.session
def table2(session: nox.Session) -> None:
    """Table 2: T2I-CompBench out of distribution (mini: the held-out split)."""
    _table(session, "table2")


@nox.session
def table3(session: nox.Session) -> None:
    """Table 3: the Manifold Anchor Regularization ablation."""
    _table(session, "table3")


@nox.session
def seesaw(session: nox.Session) -> None:
    """Each benchmark along each GRPO teacher's and GRPO-Mix's training: ``-- [--preset sd35m] [--retrain]``."""
    _install(session)
    session.run("python", "-m", "flowopd.paper", "seesaw", *session.posargs, env=_env())


@nox.session
def pretrain(session: nox.Session) -> None:
    """Pretrain the mini base from scratch (about 15 minutes on 2 cores); pass key=value overrides after --."""
    _install(session)
    out = "runs/pretrain-from-scratch"
    session.run("python", "-m", "flowopd.train", "pretrain", "training/configs/mini_pretrain.toml",
                f"out={out}", *session.posargs, env=_env())
    session.run("python", "-m", "flowopd.bench", "evaluate", out, "--out", f"{out}/eval", env=_env())


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


@nox.session
def parity(session: nox.Session) -> None:
    """Our scorers against the official packages on the same random weights: \
``-- [--only hps,ocr] [--work DIR] [--full]``.

    Not in the default run. Builds (once) two official environments under .nox/parity-envs/ (torch 2.14 +
    image-reward, hpsv2, open_clip, openai clip, mmdet 3.3; PaddleOCR 2.9.1) and prints one table row per compared
    quantity (docs/scorers/parity.md). ``--full`` uses the released architectures (ViT-H-14, ViT-L/14): slow.
    """
    session.install(TORCH)
    session.install("-e", ".[geneval,preference,hps,ocr]")
    _ENVS.parity_session(session, ROOT)
