"""Images/s of ``python -m flowopd.bench evaluate`` with 1 process and with N processes (torchrun), in one run.

``python benchmarks/perf/eval_scaling.py [--processes 1,2] [--repeats R] [--batch-size B] [--limit N]``

Each process count evaluates the same checkpoint on the same benchmarks into a fresh ``--out`` directory, the
counts taking turns (and turns at going first) ``--repeats`` times, so that a change in the machine's load hits
them alike; each run is as the user would run it: 1 process is ``python -m flowopd.bench evaluate`` (torch's default
threads), N > 1 is ``torchrun --standalone --nproc_per_node N -m flowopd.bench evaluate`` (``OMP_NUM_THREADS``
= CPU cores // N, torchrun's own choice being 1). The wall time covers the whole command - start-up, model and
scorer loading, generation, scoring, merging - and images/s counts the images generated (the scored rows of
benchmarks that share another's images, such as mini-pick, come on top); CPU seconds per image (user + system
time of all the run's processes) show the work added by more processes whatever the load. The script also says
whether the
per-sample rows of every run equal those of the first (on CPU, other threads per process may move a rare pixel
by 1/255; see flowopd.bench.distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command(processes: int, evaluate_args: Sequence[str]) -> list[str]:
    """The command line of one run (``python -m torch.distributed.run`` is what ``torchrun`` runs)."""
    if processes == 1:
        return [sys.executable, "-m", "flowopd.bench", "evaluate", *evaluate_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "flowopd.bench", "evaluate", *evaluate_args]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(processes: int, evaluate_args: Sequence[str], out: Path, threads: int | None = None) -> dict[str, float]:
    """Run one evaluation into ``out`` (``threads`` per process; default: torch's for 1 process, cores // N for N);
    wall and CPU seconds, images generated, rows scored."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    done = subprocess.run(command(processes, [*evaluate_args, "--out", str(out)]), env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"evaluate with {processes} process(es) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    images = len(list((out / "images").rglob("*.png")))
    results = json.loads((out / "results.json").read_text())
    rows = sum(entry["n_images"] for entry in results["benchmarks"].values())
    return {"wall_s": wall, "cpu_s": cpu, "images": images, "rows": rows,
            "threads": int(env.get("OMP_NUM_THREADS", 0)) or None}


def summarise(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Totals over the repeats of one process count: images/s = all images / all wall seconds."""
    wall, cpu, images = (sum(r[k] for r in runs) for k in ("wall_s", "cpu_s", "images"))
    return {"runs": len(runs), "wall_s": wall / len(runs), "images": runs[0]["images"], "rows": runs[0]["rows"],
            "images_per_s": images / wall, "cpu_s_per_image": cpu / images, "threads": runs[0]["threads"]}


def same_rows(a: Path, b: Path) -> bool:
    import pandas as pd

    names = sorted(p.name for p in (a / "scores").glob("*.parquet"))
    if names != sorted(p.name for p in (b / "scores").glob("*.parquet")):
        return False
    for name in names:
        x, y = (pd.read_parquet(run / "scores" / name).drop(columns=["file"]) for run in (a, b))
        if not x.sort_values(["index", "sample"]).reset_index(drop=True).equals(
                y.sort_values(["index", "sample"]).reset_index(drop=True)):
            return False
    return True


def render(measured: dict[int, dict[str, float]], rows_equal: dict[int, bool], cmd: str, load: tuple[str, str]) -> str:
    first = min(measured)
    lines = [
        "| processes | threads per process | runs | wall s (mean) | images generated | rows scored | images / s | "
        f"CPU s / image | images/s ratio to {first} process(es) | rows equal to {first} process(es) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in measured.items():
        threads = m["threads"] or f"torch default ({os.cpu_count()} cores)"
        lines.append(f"| {n} | {threads} | {m['runs']} | {m['wall_s']:.1f} | {m['images']} | {m['rows']} | "
                     f"{m['images_per_s']:.2f} | {m['cpu_s_per_image']:.3f} | "
                     f"{m['images_per_s'] / measured[first]['images_per_s']:.2f} | "
                     f"{'yes' if rows_equal[n] else 'no'} |")
    lines += ["", f"Command: `{cmd}`; load average before / after: {load[0]} / {load[1]}."]
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/perf/eval_scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default: 1,2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each process count, taking turns")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process (default: torch's own for "
                        "1 process, CPU cores // N for N)")
    parser.add_argument("--checkpoint", default="mini:base")
    parser.add_argument("--benchmarks", help="comma-separated, or all (default: evaluate's, Table 1's four mini ones)")
    parser.add_argument("--limit", type=int, help="first N prompts of each benchmark")
    parser.add_argument("--batch-size", type=int, help="evaluate's --batch-size (default: its own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    try:
        args.process_counts = [int(p) for p in args.processes.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--processes expects comma-separated integers, got {args.processes!r}")
    if not args.process_counts or min(args.process_counts) < 1:
        parser.error(f"--processes must list counts >= 1, got {args.processes!r}")
    for name in ("repeats", "threads", "limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.command = shlex.join(["python", "benchmarks/perf/eval_scaling.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    evaluate_args = [args.checkpoint, "--device", args.device, "--no-progress"]
    for flag, value in (("--benchmarks", args.benchmarks), ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None:
            evaluate_args += [flag, str(value)]
    load_before = _loadavg()
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.process_counts}
    with tempfile.TemporaryDirectory(prefix="eval_scaling_") as tmp:
        outs = {n: Path(tmp) / f"p{n}" for n in args.process_counts}
        counts = args.process_counts
        for r in range(args.repeats):
            for n in counts[r % len(counts) :] + counts[: r % len(counts)]:
                shutil.rmtree(outs[n], ignore_errors=True)  # a fresh run each time: nothing cached
                runs[n].append(run_once(n, evaluate_args, outs[n], args.threads))
                print(f"[eval_scaling] {n} process(es): {runs[n][-1]['images'] / runs[n][-1]['wall_s']:.2f} "
                      f"images/s", file=sys.stderr)
        measured = {n: summarise(runs[n]) for n in counts}
        rows_equal = {n: same_rows(outs[counts[0]], outs[n]) for n in counts}
    text = render(measured, rows_equal, args.command, (load_before, _loadavg()))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
