"""``python -m flowopd.paper``: table, seesaw - the paper's tables and seesaw figure, reproduced.

Every number is range-checked when parsed; every error ends as one or two lines and exit status 2
(flowopd.errors.run_cli; a traceback only with FLOWOPD_DEBUG=1). Every subcommand takes --log-level
(flowopd.logs): results print at every level.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flowopd.errors import CLIParser, check_device, positive_int, run_cli
from flowopd.logs import add_log_level_argument, configure

PROG = "python -m flowopd.paper"
#: where the list is found without --config (flowopd.paper.checkpoints, not imported here: --help stays fast)
CONFIG_DEFAULT = "default: $FLOWOPD_SD35M_CHECKPOINTS, else the project's reports/sd35m_checkpoints.toml"


def cmd_table(args: argparse.Namespace) -> int:
    from flowopd.paper.tables import reproduce

    paths = reproduce(args.name, preset=args.preset, retrain_missing=args.retrain, retrain_all=args.retrain_all,
                      config=Path(args.config) if args.config else None, out=Path(args.out),
                      device=args.device, limit=args.limit)
    print(Path(paths["md"]).read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_seesaw(args: argparse.Namespace) -> int:
    from flowopd.paper.seesaw import seesaw

    paths = seesaw(args.preset, retrain=args.retrain, config=Path(args.config) if args.config else None,
                   out=Path(args.out), device=args.device)
    print(Path(paths["md"]).read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CLIParser)

    p = sub.add_parser("table", help="reproduce a paper table (table1, table2, table3)")
    p.add_argument("name")
    p.add_argument("--preset", default="mini", choices=["mini", "sd35m"])
    p.add_argument("--retrain", action="store_true", help="train the rows whose checkpoints are missing")
    p.add_argument("--retrain-all", action="store_true", help="retrain every row from scratch (slow)")
    p.add_argument("--config", help=f"sd35m checkpoint paths ({CONFIG_DEFAULT})")
    p.add_argument("--out", default="reports/out")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--limit", type=positive_int,
                   help="evaluate only the first N prompts of each benchmark (the table is then marked partial)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("seesaw", help="each benchmark along each GRPO teacher's and GRPO-Mix's training (figure)")
    p.add_argument("--preset", default="mini", choices=["mini", "sd35m"])
    p.add_argument("--retrain", action="store_true", help="train the GRPO runs that have no checkpoints (slow)")
    p.add_argument("--config", help=f"sd35m: file whose [seesaw] table lists the run dirs ({CONFIG_DEFAULT})")
    p.add_argument("--out", default="reports/out/seesaw")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=cmd_seesaw)

    for p in sub.choices.values():
        add_log_level_argument(p)
    return parser


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_level)
    check_device(args.device)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point; every error is one or two lines and exit status 2 (traceback with FLOWOPD_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _dispatch(argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
