"""``python -m flowopd.bench``: list, evaluate, report, compare, check, serve (the paper's tables and seesaw
figure: ``python -m flowopd.paper table|seesaw``).

Every number is range-checked when parsed; every error ends as one or two lines and exit status 2
(flowopd.errors.run_cli; a traceback only with FLOWOPD_DEBUG=1). Every subcommand takes --log-level
(flowopd.logs): results print at every level.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flowopd.bench.spec import BenchmarkSpec, all_specs
from flowopd.bench.weights import weights_cached
from flowopd.errors import CLIParser, UserError, check_device, non_negative_float, positive_int, run_cli
from flowopd.logs import add_log_level_argument, configure

EXTRA_IMPORTS = {"ocr": ["rapidocr_onnxruntime"], "hps": [], "judge": [], "compbench": [], "deqa": []}


def runnable_status(spec: BenchmarkSpec) -> str:
    """'yes', or what is missing to run the benchmark on this machine."""
    import importlib.util

    from flowopd.registry import import_string
    from flowopd.scorers import SCORERS

    target = SCORERS.target(spec.scorer)
    if importlib.util.find_spec(target.partition(":")[0]) is None:
        return f"no: scorer {spec.scorer!r} not implemented yet ({target})"
    try:
        cls = import_string(target)
    except ImportError as e:
        return f"no: {e} (pip install 'flowopd[{spec.extra}]')" if spec.extra else f"no: {e}"
    missing: list[str] = []
    if hasattr(cls, "missing_requirements"):
        missing = list(cls.missing_requirements(**spec.scorer_options))
    else:
        for module in EXTRA_IMPORTS.get(spec.extra, []):
            if importlib.util.find_spec(module) is None:
                missing.append(f"pip install 'flowopd[{spec.extra}]'")
        missing += [f"weights {w}" for w in spec.weights if not weights_cached(w)]
    return "yes" if not missing else "no: " + ", ".join(missing)


def cmd_list(args: argparse.Namespace) -> int:
    import warnings

    from flowopd.data import DATA_HINT, PromptFileError, UnpinnedPromptSetWarning, load_prompts

    rows = [("benchmark", "scale", "prompts", "images", "scorer", "runnable here")]
    not_cached = []
    for name, spec in sorted(all_specs().items(), key=lambda kv: (kv[1].scale_name != "mini", kv[0])):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnpinnedPromptSetWarning)
                n = str(len(load_prompts(spec.prompts)))
        except (PromptFileError, ImportError) as e:
            n = "not cached"
            not_cached.append(name)
            if args.verbose:
                print(f"{name}: {e}", file=sys.stderr)
        images = str(spec.generation.images_per_prompt)
        rows.append((name, spec.scale_name, n, images, spec.scorer, runnable_status(spec)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    if not_cached:
        print(f"\n{len(not_cached)} prompt sets are not available here ({', '.join(not_cached[:3])}"
              f"{', ...' if len(not_cached) > 3 else ''}): they download on first use, or offline set "
              f"FLOWOPD_DATA_DIR to a copy; {DATA_HINT}; `list -v` says why each is missing")
    return 0


def _names(text: str | None, flag: str) -> list[str] | None:
    """A comma-separated list of names (None when the flag is absent); refuses an empty one."""
    if text is None:
        return None
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise UserError(f"{flag} {text!r}: no names given (comma-separated benchmark names)")
    return names


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flowopd.bench.evaluate import evaluate
    from flowopd.bench.report import markdown_summary
    from flowopd.bench.spec import get_spec
    from flowopd.scorers.client import RemoteScorer

    benchmarks = _names(args.benchmarks, "--benchmarks")
    check_device(args.device)
    remote = {}
    for item in args.scorer_url:
        name, sep, url = item.partition("=")
        if not sep or not url or not url.startswith(("http://", "https://")):
            raise UserError(f"--scorer-url expects BENCHMARK=http://HOST:PORT, got {item!r}")
        remote[name] = RemoteScorer(url, expected_name=get_spec(name).scorer)
    generation = {
        k: v
        for k, v in {"steps": args.steps, "height": args.resolution, "width": args.resolution,
                     "guidance_scale": args.guidance_scale, "images_per_prompt": args.images_per_prompt}.items()
        if v is not None
    }
    from flowopd.bench.distributed import launched
    from flowopd.models.loading import resolve_checkpoint

    # the CHECKPOINT argument, resolved once here with its --base and passed down
    checkpoint = resolve_checkpoint(args.checkpoint, args.base) if args.checkpoint is not None else None
    with launched(args.device) as (shard, device):  # torchrun / accelerate launch: this process's share
        results = evaluate(
            generation=generation,
            scorers=remote,
            checkpoint=checkpoint,
            benchmarks=benchmarks,
            out=args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            device=device,
            images=args.images,
            base=args.base if checkpoint is None else None,  # for the default checkpoint (refused there)
            progress=not args.no_progress,
            positional=args.positional,
            shard=shard,
        )
    if shard.is_main:
        print(markdown_summary(results))
        print(f"\nresults: {results['_path']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flowopd.bench.report import write_report

    paths = write_report(args.runs, args.out, table_name=args.table, scale=args.scale)
    print(Path(paths["md"]).read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flowopd.bench.compare import compare_runs, markdown_comparison, pool_replicates, write_comparison

    runs_a, runs_b = ([r for r in arg.split(",") if r.strip()] for arg in (args.run_a, args.run_b))
    if not runs_a or not runs_b:
        raise UserError("compare: RUN_A and RUN_B each name at least one run directory or results.json")
    res_a, res_b = pool_replicates(runs_a), pool_replicates(runs_b)
    benchmarks = _names(args.benchmarks, "--benchmarks")
    rows = compare_runs(res_a, res_b, benchmarks=benchmarks, n_boot=args.n_boot)
    if args.combined:
        from flowopd.bench.compare import compare_combined, table_weights

        table, _, scale = args.combined.partition(":")
        if scale not in ("", "mini", "sd35m"):
            raise UserError(f"--combined {args.combined}: the scale after ':' is mini or sd35m")
        label, weights = table_weights(table, scale or "mini")
        rows.append(compare_combined(res_a, res_b, weights, label=f"{table}:{label}", n_boot=args.n_boot))
    name_a, name_b = res_a["checkpoint"], res_b["checkpoint"]
    print(markdown_comparison(rows, name_a, name_b, args.n_boot))
    from flowopd.bench.results import partial_benchmarks

    compared = {row["benchmark"] for row in rows if "benchmark" in row}
    for side, res in (("A", res_a), ("B", res_b)):  # a comparison on a few prompts says so, as every table does
        for bench, note in partial_benchmarks(res).items():
            if bench in compared:
                print(f"{side} {bench}: {note} (the difference is over these prompts only)")
    if args.out:
        paths = write_comparison(rows, name_a, name_b, args.out, args.n_boot)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from flowopd.bench.check import check_floors, load_thresholds
    from flowopd.bench.results import load_results, partial_benchmarks

    results = load_results(args.results)
    floors = load_thresholds(args.thresholds, args.section, results["checkpoint"])
    failures = check_floors(results, floors)
    if not args.allow_partial:  # a score on a few prompts is not the benchmark's score
        failures += [f"{bench}: {note} (re-run without --limit, or pass --allow-partial)"
                     for bench, note in partial_benchmarks(results).items()]
    for line in failures:
        print(f"FAIL {line}")
    if failures:
        print(f"{len(failures)} failures over {len(floors)} floors")
        return 1
    print(f"ok: {len(floors)} metrics at or above their floors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="python -m flowopd.bench", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CLIParser)

    p = sub.add_parser("list", help="list benchmarks and whether they can run here")
    p.add_argument("-v", "--verbose", action="store_true", help="say why a prompt count is unknown")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("evaluate", help="generate (resumable), score and aggregate")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="mini:NAME, a diffusers SD3 dir or hub id, or a LoRA adapter dir (default: mini:base)")
    p.add_argument("--benchmarks", help="comma-separated names, or 'all' for every benchmark of the checkpoint's "
                   "scale (default: Table 1's four, mini-geneval,mini-ocr,mini-quality,mini-pick for a mini "
                   "checkpoint, geneval,ocr,deqa,pickscore otherwise)")
    p.add_argument("--out", help="run directory (default: runs/<checkpoint>)")
    p.add_argument("--limit", type=positive_int,
                   help="evaluate only the first N prompts of each benchmark (the results are then partial)")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per batch (default: 64 for mini checkpoints, else 8)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--base", help="base model for a LoRA adapter checkpoint")
    p.add_argument("--images", help="score images generated elsewhere: GenEval folders <idx>/metadata.jsonl + "
                                    "<idx>/samples/*.png, matched to the benchmark's prompts by their metadata")
    p.add_argument("--positional", action="store_true",
                   help="with --images: score folder or file <i> against prompt i, without matching metadata")
    p.add_argument("--scorer-url", action="append", default=[], metavar="BENCHMARK=URL",
                   help="score BENCHMARK through a scorer server (python -m flowopd.bench serve); repeatable")
    p.add_argument("--steps", type=positive_int, help="override the spec's sampling steps")
    p.add_argument("--resolution", type=positive_int, help="override the spec's height and width")
    p.add_argument("--guidance-scale", type=non_negative_float, help="override the spec's CFG scale")
    p.add_argument("--images-per-prompt", type=positive_int, help="override the spec's images per prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="markdown, CSV and HTML report of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories or results.json files")
    p.add_argument("--out", default="reports/out", help="output directory")
    p.add_argument("--table", help="a table definition in reports/tables (e.g. table1)")
    p.add_argument("--scale", default="mini", choices=["mini", "sd35m"])
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="paired difference of two runs (A - B) with a paired bootstrap 95%% CI")
    p.add_argument("run_a", help="run directory or results.json of checkpoint A; several, comma-separated "
                   "(A1,A2,A3), pool replicate runs of one recipe, e.g. training seeds")
    p.add_argument("run_b", help="run directory or results.json of checkpoint B (same specs and settings); "
                   "comma-separated replicates as for A")
    p.add_argument("--benchmarks", help="comma-separated names (default: every benchmark both runs hold)")
    p.add_argument("--out", help="also write compare.md and compare.csv to this directory")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap draws (default: 2000)")
    p.add_argument("--combined", metavar="TABLE[:SCALE]",
                   help="also compare a table's combined column (table1 -> Table 1's Average at the mini scale; "
                        "table1:sd35m), resampling the benchmarks jointly")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="exit 1 when a metric is below its floor")
    p.add_argument("results", help="a run directory or results.json")
    p.add_argument("--thresholds", default="benchmarks/thresholds.toml")
    p.add_argument("--section", help="the [floors.NAME] section (default: the checkpoint's, else default)")
    p.add_argument("--allow-partial", action="store_true",
                   help="pass results of a partial run (--limit) instead of failing them")
    p.set_defaults(func=cmd_check)

    for p in sub.choices.values():  # serve, below, parses its own --log-level
        add_log_level_argument(p)
    sub.add_parser("serve", help="run a scorer behind a local HTTP server (serve --help for its options)")
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv[:1] in (["table"], ["seesaw"]):  # moved above bench, which does not import the paper's package
        raise UserError(f"`python -m flowopd.bench {argv[0]}` moved: run `python -m flowopd.paper {argv[0]}` "
                        f"with the same arguments")
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to the server's own parser
        from flowopd.scorers.server import main as serve_main

        return serve_main(argv[1:], prog="python -m flowopd.bench serve")
    args = build_parser().parse_args(argv)
    configure(args.log_level)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point; every error is one or two lines and exit status 2 (traceback with FLOWOPD_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _dispatch(argv), prog="python -m flowopd.bench")


if __name__ == "__main__":
    sys.exit(main())
