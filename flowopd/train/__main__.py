"""``python -m flowopd.train SUBCOMMAND CONFIG.toml [key=value ...]``: one entry point for every recipe.

Subcommands map to ``"module:function"`` strings imported on first use, so ``pretrain`` never imports the
GRPO or OPD code. Each function takes the arguments after the subcommand and returns an exit code.

Every error ends at one boundary (:func:`flowopd.errors.run_cli`): a bad config, a missing file, an unreadable
checkpoint, a run that diverged are one or two lines on stderr and exit status 2; the traceback only with
``FLOWOPD_DEBUG=1``. ``--log-level LEVEL`` anywhere after the subcommand sets what every subcommand logs
(:mod:`flowopd.logs`).
"""

from __future__ import annotations

import difflib
import itertools
import sys
from collections.abc import Sequence

from flowopd.errors import CLIParser, run_cli
from flowopd.logs import add_log_level_argument, configure
from flowopd.registry import import_string

COMMANDS: dict[str, str] = {
    "pretrain": "flowopd.train.pretrain:main",
    "grpo": "flowopd.train.grpo:main",
    "opd": "flowopd.train.opd:main",
    "sft": "flowopd.train.sft:main",
    "merge": "flowopd.train.merge_cli:main",
    "publish": "flowopd.train.publish:main",
}

_USAGE = "usage: python -m flowopd.train SUBCOMMAND CONFIG.toml [key=value ...] [--log-level LEVEL]"


def _split_log_level(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(every ``--log-level`` with its value, the other arguments in order): no subcommand has such a flag."""
    flag: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--log-level":
            flag += [arg, *itertools.islice(it, 1)]
        elif arg.startswith("--log-level="):
            flag.append(arg)
        else:
            rest.append(arg)
    return flag, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"{_USAGE}\nsubcommands: {', '.join(sorted(COMMANDS))}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"unknown subcommand {command!r}{hint}; known: {', '.join(sorted(COMMANDS))}\n{_USAGE}", file=sys.stderr)
        return 2
    prog = f"python -m flowopd.train {command}"
    flag, rest = _split_log_level(rest)
    levels = CLIParser(prog=prog, add_help=False)
    add_log_level_argument(levels)
    configure(levels.parse_args(flag).log_level)  # a bad level: argparse's two lines naming --log-level, exit 2
    return run_cli(lambda: import_string(COMMANDS[command])(rest), prog=prog)


if __name__ == "__main__":
    sys.exit(main())
