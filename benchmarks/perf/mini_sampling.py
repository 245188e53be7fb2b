"""Rollouts/s and evaluation images/s of the mini model: the reference path against the fast one, in one run.

``python benchmarks/perf/mini_sampling.py [--repeats R] [--rollout-batch B] [--eval-batch B] [--steps S]``

Two measurements on the committed ``mini:base`` checkpoint, at 32 px with 10 steps by default:

- rollouts: ``flowopd.train.rollout.sample_sde_trajectory`` as training/configs/mini_grpo_geneval.toml draws them
  (a batch of 96 rollouts = 192 rows with CFG 4.0, an SDE window of 2 steps, one generator per sample);
- evaluation images: ``flowopd.sampling.sample_ode`` as the default ``evaluate`` samples (a batch of 64, CFG 4.0).

Each measurement runs in a fresh process per path, the paths taking turns (and turns at going first)
``--repeats`` times, so that a change in the machine's load hits them alike. Paths:

- old: the code before issue 23 as far as it is reachable: ``reference=True`` (``policy.velocity`` at every
  step), torch imported before flowopd (OpenMP's default wait: idle threads spin) and glibc's default trimming;
- new, spinning: the fast path (prompts encoded once per loop, in-place inference ops, freed memory kept), torch
  imported first as in the old path: what the code change alone buys, as on a quiet machine;
- new: the default, as the CLIs run it (flowopd imported first: idle OpenMP threads sleep).

The report gives the median wall time and CPU time (user + system) per batch, rollouts/s or images/s, the
ratios to the old path, and whether every path produced the old path's tensors bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KINDS = ("rollout", "evaluate")
PATHS = ("old", "new-spinning", "new")


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=_positive("--repeats"), default=2, help="turns per path (default 2)")
    parser.add_argument("--rollout-batch", type=_positive("--rollout-batch"), default=96,
                        help="rollouts per batch (mini_grpo_geneval.toml: sample_batch_size = 96)")
    parser.add_argument("--eval-batch", type=_positive("--eval-batch"), default=64,
                        help="images per batch (evaluate's mini batch size: 64)")
    parser.add_argument("--steps", type=_positive("--steps"), default=10, help="sampling steps (default 10)")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One timed batch of one kind on one path; prints a JSON line and saves the output tensors."""
    if args.worker == "new":
        import flowopd  # noqa: F401  first, as in the CLIs: torch's OpenMP threads then wait passively
    import torch  # the other paths import it first: OpenMP's default, spinning wait
    from safetensors.torch import save_file

    from flowopd.models.mini import load_mini
    from flowopd.sampling import sample_ode
    from flowopd.train.rollout import sample_sde_trajectory
    from flowopd.world.grammar import prompt_set

    policy = load_mini("mini:base")
    reference = args.worker == "old"
    prompts = [m["prompt"] for m in prompt_set("geneval", "test")]
    n = args.rollout_batch if args.kind == "rollout" else args.eval_batch
    texts = [prompts[i % len(prompts)] for i in range(n)]

    def run(count: int, steps: int) -> dict[str, torch.Tensor]:
        cond = policy.encode_prompts(texts[:count])
        noise = policy.initial_noise(range(count), 32, 32)
        if args.kind == "evaluate":
            return {"images": sample_ode(policy, cond, noise, steps, 4.0, reference=reference)}
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(count)]
        window = [min(1, steps - 1), min(2, steps - 1)]
        traj = sample_sde_trajectory(policy, cond, noise, steps, 4.0, 0.7, sde_steps=window, generator=generators,
                                     reference=reference)
        return {k: getattr(traj, k) for k in ("states", "next_states", "log_probs", "latents", "images")}

    run(min(n, 4), 1)  # warm-up: oneDNN builds its kernels on the first call
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = run(n, args.steps)
    wall, cpu1 = time.perf_counter() - wall0, resource.getrusage(resource.RUSAGE_SELF)
    save_file({k: v.contiguous() for k, v in out.items()}, args.save)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    print(json.dumps({"wall": wall, "cpu": cpu, "items": n, "threads": torch.get_num_threads()}))


def measure(path: str, kind: str, args: argparse.Namespace, save: Path) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--kind", kind, "--save", str(save),
               "--rollout-batch", str(args.rollout_batch), "--eval-batch", str(args.eval_batch),
               "--steps", str(args.steps)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        sys.exit(f"mini_sampling.py: the {path} {kind} run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mini_sampling_") as tmp:
        saved = {}
        for kind in KINDS:
            for turn in range(args.repeats):
                for path in PATHS[turn % 3:] + PATHS[: turn % 3]:
                    saved[kind, path] = Path(tmp) / f"{kind}-{path}.safetensors"
                    result = measure(path, kind, args, saved[kind, path])
                    runs.setdefault((kind, path), []).append(result)
                    print(f"  {kind} {path}: {result['wall']:.1f} s wall, {result['cpu']:.1f} s CPU", flush=True)
        same = {kind: all(same_tensors(saved[kind, "old"], saved[kind, p]) for p in PATHS[1:]) for kind in KINDS}
    threads = runs["rollout", "new"][0]["threads"]
    print(f"\nmini:base, 32 px, {args.steps} steps, CFG 4.0, torch {threads} threads, {os.cpu_count()} CPUs, "
          f"medians of {args.repeats} turns per path; load average at the end {os.getloadavg()[0]:.1f}")
    print("| measurement | old | new, spinning | new | new, spinning / old | new / old |")
    print("|---|---|---|---|---|---|")
    for kind, unit in (("rollout", "rollouts/s"), ("evaluate", "images/s")):
        items = runs[kind, "old"][0]["items"]
        for label, key in (("", "wall"), (" per CPU second", "cpu")):
            rate = {p: items / statistics.median(r[key] for r in runs[kind, p]) for p in PATHS}
            print(f"| {kind} {unit}{label} (batch of {items}) | " + " | ".join(f"{rate[p]:.2f}" for p in PATHS)
                  + f" | {rate['new-spinning'] / rate['old']:.2f}x | {rate['new'] / rate['old']:.2f}x |")
    for kind in KINDS:
        print(f"{kind}: every path's outputs identical to the old path's bit for bit: {'yes' if same[kind] else 'NO'}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
