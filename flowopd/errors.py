"""One error boundary for every entry point (``python -m flowopd.bench``, ``serve``, ``python -m flowopd.train``,
the nox sessions that call them).

A user error - a bad flag, file, spec field, missing data - ends as one or two lines on stderr and exit status 2;
an unexpected exception (a bug) as one line naming its type, also exit 2, with a pointer to ``FLOWOPD_DEBUG=1``.
With ``FLOWOPD_DEBUG=1`` in the environment every exception propagates with its traceback. Usage::

    def main(argv=None) -> int:
        return run_cli(lambda: _main(argv), prog="python -m flowopd.bench")

Raise :class:`UserError` (or one of the standard types in :data:`USER_ERRORS`) with a message that names the
file, field or flag at fault and what to do; :class:`CLIParser` gives argparse's errors the same two-line form.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn, TextIO, TypeVar

N = TypeVar("N", int, float)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error caused by the user's input; its message is the whole report (no traceback)."""


#: exception types whose message is written for the user (file, key, flag and what to do)
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, LookupError, OSError, ImportError)


def debug_enabled() -> bool:
    """Whether ``FLOWOPD_DEBUG`` asks for tracebacks (any value but empty, ``0``, ``false``, ``no``)."""
    return os.environ.get("FLOWOPD_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def error_message(exc: BaseException) -> str:
    """The user-facing text of an exception: plain (a KeyError's message unquoted), at most two lines."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc) or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    return "\n".join(lines[:2]) + (" [...]" if len(lines) > 2 else "")


def run_cli(func: Callable[[], int | None], prog: str) -> int:
    """Call ``func`` and turn any exception into a short message on stderr and a non-zero exit status.

    Returns ``func``'s exit status (``None`` counts as 0). ``SystemExit`` (argparse's ``--help`` and usage errors)
    passes through unchanged. Warnings print as one ``warning: ...`` line each.
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(func() or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the boundary: every other exception becomes a message
        if debug_enabled():
            raise
        if isinstance(exc, USER_ERRORS):
            print(f"error: {error_message(exc)}", file=sys.stderr)
        else:
            print(f"error: internal error ({type(exc).__name__}: {error_message(exc).splitlines()[0]}); "
                  f"re-run with FLOWOPD_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return EXIT_USER_ERROR


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings as one ``warning: ...`` line (no source line; the message names what it is about)."""
    print(f"warning: {message}", file=file or sys.stderr)


class CLIParser(argparse.ArgumentParser):
    """argparse with a two-line usage error (``prog: error: ...`` and where the help is) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\nsee `{self.prog} --help`\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded(int, text, low=1, what="an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded(int, text, low=0, what="an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _bounded(float, text, low=0.0, what="a finite number > 0", strict=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _bounded(float, text, low=0.0, what="a finite number >= 0")


def _bounded(kind: type[N], text: str, low: float, what: str, strict: bool = False) -> N:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def check_device(device: str) -> None:
    """Refuse a ``--device`` value torch cannot parse, or CUDA where there is none (the message names the flag)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
