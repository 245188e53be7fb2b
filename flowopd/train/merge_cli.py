"""The merge cold start (METHOD.md s.2-3 "Merging"): combine teacher adapters into one student adapter.

    python -m flowopd.train merge --adapters A B ... --method METHOD [--weights W ...] [--density D] [--rank R]
        [--seed S] --out DIR

Adapters are peft directories or ``mini:NAME``. Methods:

- ``average``, ``weighted``, ``sum``: the public code's merge modes (Flow-OPD ``scripts/merge.py --merge_mode``):
  every tensor of the adapters combined element-wise, the ``A`` factors and the ``B`` factors separately -
  ``average`` the mean, ``weighted`` the mean with ``--weights`` normalised to sum 1, ``sum`` the sum (which
  scales an update ``B A`` by n^2 for n equal adapters: a warning says so). At least two adapters of one rank
  and alpha; the adapter config is the first adapter's. ``mean(B) mean(A)`` is not the mean of the updates
  ``B A``: kept for parity. Ours combines in float32 and stores each tensor in its own dtype, where the public
  script computes in the adapters' dtype: identical for float32 adapters (the public ones), within the last
  bit for bf16/fp16 ones.
- ``factor-mean``: ``average`` without weights, ``weighted`` with them (one adapter allowed).
- ``linear`` (task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: merges of the
  weight updates ``Delta W = (alpha / r) B A`` through peft's ``merge_utils`` (flowopd.train.merge), brought
  back to LoRA factors by a truncated SVD of rank ``--rank`` (default: the sum of the adapters' ranks, which
  is exact for ``linear``; the pruning methods give full-rank updates that any rank truncates).

The output is a peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) on the
adapters' common base (their ``base_model_name_or_path``, which must agree), loadable by
``flowopd.models.loading.load_policy`` and ``python -m flowopd.bench evaluate DIR``, and usable as OPD's
``lora_path``; ``merge.json`` beside it records the inputs and options.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowopd.logs import add_log_level_argument, configure
from flowopd.train.merge import delta_weights, deltas_to_lora, factor_mean, factor_sum, merge_deltas

logger = logging.getLogger(__name__)

#: the public script's modes (element-wise on the factors, like factor-mean)
PUBLIC_METHODS = ("average", "weighted", "sum")
METHODS = ("factor-mean", *PUBLIC_METHODS, "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_adapter(checkpoint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, state dict)`` of a peft LoRA directory or ``mini:NAME``."""
    from safetensors.torch import load_file

    from flowopd.models.loading import model_dir

    path = model_dir(checkpoint)
    if not (path / _CONFIG).is_file() or not (path / _WEIGHTS).is_file():
        raise FileNotFoundError(f"{checkpoint!r}: no peft adapter at {path} (expected {_CONFIG} and {_WEIGHTS})")
    config = json.loads((path / _CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / _CONFIG}: peft_type {config.get('peft_type')!r}; only LoRA adapters merge")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path / _CONFIG}: per-module rank_pattern/alpha_pattern are not supported by the merge")
    return config, load_file(str(path / _WEIGHTS))


def lora_scaling(config: dict[str, Any]) -> float:
    """peft's ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def common_base(checkpoints: Sequence[str], configs: Sequence[dict[str, Any]]) -> str | None:
    """The ``base_model_name_or_path`` every adapter names (an error if they disagree)."""
    from flowopd.models.loading import checkpoint_dir

    bases = [c.get("base_model_name_or_path") for c in configs]

    def key(base: str | None) -> str | None:
        if base is None:
            return None
        path = checkpoint_dir(base)
        return str(path.resolve()) if path.exists() else base

    if len({key(b) for b in bases}) > 1:
        listing = ", ".join(f"{c!r}: {b!r}" for c, b in zip(checkpoints, bases))
        raise ValueError(f"the adapters have different bases ({listing}); merge adapters of one base model only")
    return bases[0]


def merge_adapters(
    checkpoints: Sequence[str],
    method: str,
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The merged adapter as ``(adapter config dict, state dict)``; see the module docstring."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if len(checkpoints) < 1:
        raise ValueError("merge: pass at least one adapter")
    read = [read_adapter(c) for c in checkpoints]
    configs, states = [c for c, _ in read], [s for _, s in read]
    base = common_base(checkpoints, configs)
    out = dict(configs[0], base_model_name_or_path=base)
    if method in PUBLIC_METHODS:
        if len(checkpoints) < 2:
            raise ValueError(
                f"merge --method {method}: the public merge needs at least 2 adapters, got {len(checkpoints)}"
            )
        if method == "weighted" and weights is None:
            raise ValueError("merge --method weighted needs --weights (one per adapter; normalised to sum 1)")
        if method != "weighted" and weights is not None:
            raise ValueError(f"merge --method {method} takes no --weights (use --method weighted)")
    if method in ("factor-mean", *PUBLIC_METHODS):
        shapes = {(c["r"], c["lora_alpha"], bool(c.get("use_rslora"))) for c in configs}
        if len(shapes) > 1:
            raise ValueError(f"{method} combines the factors: the adapters need one rank and alpha, got "
                             f"(r, alpha, rslora) = {sorted(shapes)}; use a delta merge (linear, ties ...)")
        if method == "sum":
            n = len(states)
            logger.warning(
                f"merge --method sum adds the factors: n = {n} equal adapters would give {n * n} x their update B A "
                f"(use average or weighted for a mean)")
            return out, factor_sum(states)
        return out, factor_mean(states, weights)
    deltas = [delta_weights(s, lora_scaling(c)) for s, c in zip(states, configs)]
    merged = merge_deltas(deltas, method, weights, density, seed)
    rank = rank or sum(c["r"] for c in configs)
    scaling = lora_scaling(dict(configs[0], use_rslora=False))  # keep the first adapter's alpha / r
    out.update(r=rank, lora_alpha=scaling * rank, use_rslora=False)
    return out, deltas_to_lora(merged, rank, scaling)


def write_adapter(out: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                  provenance: dict[str, Any] | None = None) -> Path:
    """Write a peft adapter directory (and ``merge.json`` with ``provenance``)."""
    from safetensors.torch import save_file

    from flowopd.models.loading import checkpoint_dir

    path = checkpoint_dir(str(out))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / _WEIGHTS), metadata={"format": "pt"})
    (path / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if provenance is not None:
        (path / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``merge --adapters A B ... --method M --out DIR`` (the arguments after the subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m flowopd.train merge", description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, help="peft adapter directories or mini:NAME")
    parser.add_argument("--method", choices=METHODS, default="factor-mean", help="merge method (default factor-mean)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: see the method)")
    parser.add_argument("--density", type=float, default=1.0, help="share of entries kept by ties/dare (default 1)")
    parser.add_argument("--rank", type=int, help="rank of a delta merge's factors (default: sum of the ranks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    parser.add_argument("--out", required=True, help="output adapter directory (or mini:NAME)")
    add_log_level_argument(parser, default=None)  # None: python -m flowopd.train took the flag already
    args = parser.parse_args(argv)
    configure(args.log_level)
    config, state = merge_adapters(args.adapters, args.method, args.weights, args.density, args.rank, args.seed)
    provenance = {"method": args.method, "adapters": args.adapters, "weights": args.weights,
                  "density": args.density, "rank": config["r"], "seed": args.seed}
    path = write_adapter(args.out, config, state, provenance)
    print(f"merged {len(args.adapters)} adapters ({args.method}, rank {config['r']}) into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
