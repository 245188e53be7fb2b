"""One logging configuration for every command line (``python -m flowopd.bench``, ``serve``, ``python -m
flowopd.train`` and its subcommands, ``python -m flowopd.train.diagnostics``).

Library modules log through their module logger (``logger = logging.getLogger(__name__)``, all below
``flowopd``) and never print; a command line prints its results and calls :func:`configure` once with the
value of its ``--log-level`` flag (:func:`add_log_level_argument`). At the default level, INFO, a message is
the plain line that the ``print`` it replaced wrote, on the same stream: INFO and DEBUG on stdout, WARNING and
ERROR on stderr - so a warning the user must see still shows, and ``--log-level WARNING`` leaves stdout to the
results. A scorer server logs everything to stderr with time stamps (its stdout announces its URL).

The handler looks ``sys.stdout`` / ``sys.stderr`` up when it writes, so output redirected after configuration
(pytest's capture, ``contextlib.redirect_stdout``) follows, and a later configuration replaces it instead of
adding a second one. Used from Python without a command line, the library follows Python's default: warnings
on stderr, INFO silent until the caller configures logging (``flowopd.logs.configure("INFO")`` or its own).
"""

from __future__ import annotations

import argparse
import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LEVEL = "INFO"
MESSAGE_FORMAT = "%(message)s"
SERVER_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
ROOT = "flowopd"


class ConsoleHandler(logging.Handler):
    """Writes each record to the current ``sys.stdout`` (below WARNING) or ``sys.stderr`` (WARNING and above,
    or every record with ``stderr_only``)."""

    def __init__(self, stderr_only: bool = False) -> None:
        super().__init__()
        self.stderr_only = stderr_only

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if self.stderr_only or record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # a closed stream must not end the program: logging's own convention
            self.handleError(record)


def add_log_level_argument(parser: argparse.ArgumentParser, default: str | None = DEFAULT_LEVEL) -> None:
    """Add ``--log-level {DEBUG,INFO,WARNING,ERROR}`` (any case); argparse refuses another value naming the flag.

    ``default=None`` leaves the level to an outer command line (a subcommand run through a dispatcher that took
    the flag already): :func:`configure` then keeps what is configured.
    """
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, default=default, metavar="LEVEL",
                        help=f"messages shown: {', '.join(LEVELS)} (default: {default or DEFAULT_LEVEL}); "
                             "results print at every level")


def configure(level: str | None = DEFAULT_LEVEL, fmt: str = MESSAGE_FORMAT, stderr_only: bool = False) -> None:
    """Configure the ``flowopd`` loggers for a command line: ``level`` (one of :data:`LEVELS`; None keeps the
    level of an earlier configuration, or INFO) and one :class:`ConsoleHandler` with format ``fmt``."""
    logger = logging.getLogger(ROOT)
    ours = [h for h in logger.handlers if isinstance(h, ConsoleHandler)]
    if level is None:
        if ours:
            return
        level = DEFAULT_LEVEL
    if level not in LEVELS:
        raise ValueError(f"--log-level {level!r}: expected one of {', '.join(LEVELS)}")
    for handler in ours:
        logger.removeHandler(handler)
    handler = ConsoleHandler(stderr_only)
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
