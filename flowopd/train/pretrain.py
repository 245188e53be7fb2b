"""Pretraining of the mini world's base model: flow matching on images rendered on the fly.

``python -m flowopd.train pretrain training/configs/mini_pretrain.toml [key=value ...]``

Each step draws ``batch_size`` prompts from the grammar's train split, renders one correct image per prompt,
scales it to [-1, 1] and regresses the velocity ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``
(METHOD.md s.3), with a share of prompts replaced by the empty prompt so that CFG works. The run directory
gets ``train_log.csv`` (one row per step), periodic resumable checkpoints in ``checkpoints/`` (weights,
optimizer, EMA, RNG states, step; the last one at the final step) and, at the end, ``model.safetensors`` +
``config.json`` loadable with :func:`flowopd.models.mini.load_mini`. Rerunning the same command after an
interruption resumes from the latest checkpoint and reproduces the uninterrupted run's weights (issue 19,
point 6): a latest checkpoint that cannot be read is set aside (``step_N.pt.corrupt``) with a warning and the
previous one is used; the config may differ from the checkpoint's only in :data:`RESUME_CHANGEABLE` (recorded
in ``resume_log.jsonl``); a non-finite loss, gradient norm or weight stops the run with an error, before it is
checkpointed.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowopd.models.mini import MiniModelConfig, MiniPolicy, MiniTokenizer, build_mini, save_mini
from flowopd.train.config import ConfigError, load_config, resume_changes, to_dict
from flowopd.train.runs import CheckpointError, TrainingDivergedError, file_problem, record_resume

logger = logging.getLogger(__name__)

_LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "seconds")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Fields that may differ between an interrupted run and its resume: cadence, threads, where the run lies and the
#: sampling settings it records. max_steps is not one: the cosine schedule depends on it.
RESUME_CHANGEABLE = ("checkpoint_every", "keep_checkpoints", "threads", "out", "sample_steps", "sample_guidance")


@dataclass
class PretrainConfig:
    """Pretraining recipe of the mini world's base model (defaults: the committed ``mini:base``)."""

    out: str = "runs/mini_pretrain"
    """Run directory: train_log.csv, checkpoints/, and the final model.safetensors + config.json."""
    seed: int = 0
    """Seeds the model initialisation, the prompt/render stream and the noise/time/dropout draws."""
    max_steps: int = 700
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step (one per sampled prompt)."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.1
    """Cosine decay from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    text_share: float = 0.25
    """Share of text (OCR) prompts in the training stream; the rest are GenEval-style prompts."""
    prompt_dropout: float = 0.1
    """Share of prompts replaced by the empty prompt (trains the unconditional velocity used by CFG)."""
    time_sampling: str = "logit_normal"
    """Training times: ``uniform`` on [0, 1] or ``logit_normal`` (sigmoid of N(0, 1), SD3's choice)."""
    ema_decay: float = 0.0
    """EMA of the weights saved as the final model (0 disables; the final model is then the raw weights)."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (0: only the final model)."""
    keep_checkpoints: int = 2
    """How many of the latest periodic checkpoints to keep."""
    threads: int = 0
    """torch CPU threads (0: every core this process may use)."""
    save_dtype: str = "float32"
    """Storage dtype of the final weights (float32, float16 or bfloat16); they always load back as float32."""
    sample_steps: int = 20
    """Recommended ODE steps for sampling, recorded in config.json (the mini benchmarks' setting)."""
    sample_guidance: float = 4.0
    """Recommended CFG scale for sampling, recorded in config.json (the mini benchmarks' setting)."""
    shift: float = 1.0
    """Time shift of the sampling schedule (SD3's ``s t / (1 + (s - 1) t)``; 1 = linear)."""
    model: MiniModelConfig = field(default_factory=MiniModelConfig)
    """Network shape (``vocab_size`` 0 = from the grammar's tokenizer; ``max_length`` sets the tokenizer's)."""


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_times(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training times in (0, 1) (``uniform`` or ``logit_normal``)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {kind!r}")


def flow_matching_loss(
    policy: MiniPolicy, x0: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity against ``v = eps - x0`` at ``x_t`` (METHOD.md s.3)."""
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    return (policy(x_t, t, tokens, mask) - (noise - x0)).pow(2).mean()


def render_batch_x0(n: int, rng: np.random.Generator, text_share: float = 0.25) -> tuple[list[str], torch.Tensor]:
    """``n`` train prompts (a share ``text_share`` of text prompts) and their renderings scaled to [-1, 1]."""
    from flowopd.world.grammar import sample_prompt
    from flowopd.world.render import render_batch

    metas = [
        sample_prompt(rng, split="train", task="ocr" if rng.random() < text_share else "geneval") for _ in range(n)
    ]
    images = render_batch(metas, rng)
    return [m["prompt"] for m in metas], images * 2 - 1


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) the recipe; returns the run directory holding the final model."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))

    torch.manual_seed(cfg.seed)
    tokenizer = MiniTokenizer.from_grammar(cfg.model.max_length)
    policy = build_mini(tokenizer, shift=cfg.shift, **to_dict(cfg.model))
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    empty_tokens, empty_mask = tokenizer([""])

    step, seconds = 0, 0.0
    latest, unreadable = _latest_checkpoint(out)
    if latest is not None:
        step, seconds = _load_checkpoint(latest, cfg, policy, ema, optimizer, rng, generator, unreadable)
    log_path = out / "train_log.csv"
    _truncate_log(log_path, step)

    n_params = sum(p.numel() for p in policy.parameters())
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc=f"pretrain mini ({n_params / 1e6:.2f}M params)",
        mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True,
    )
    policy.train()
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        start = time.perf_counter() - seconds
        while step < cfg.max_steps:
            prompts, x0 = render_batch_x0(cfg.batch_size, rng, cfg.text_share)
            tokens, mask = tokenizer(prompts)
            drop = torch.rand(cfg.batch_size, generator=generator) < cfg.prompt_dropout
            tokens = torch.where(drop[:, None], empty_tokens, tokens)
            mask = torch.where(drop[:, None], empty_mask, mask)
            t = sample_times(cfg.batch_size, cfg.time_sampling, generator)
            noise = torch.randn(x0.shape, generator=generator)

            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = flow_matching_loss(policy, x0, tokens, mask, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # stop before the step spoils the weights
                raise _diverged(out, step + 1, f"loss = {loss.item()}, gradient norm = {grad_norm.item()}")
            optimizer.step()
            if ema is not None:
                _ema_update(ema, policy, cfg.ema_decay, step)
            step += 1

            seconds = time.perf_counter() - start
            log.writerow([step, f"{loss.item():.6f}", f"{lr:.3e}", f"{grad_norm.item():.4f}", f"{seconds:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
                _check_weights(out, step, policy, ema)
                log_file.flush()
                _save_checkpoint(out, cfg, step, seconds, policy, ema, optimizer, rng, generator)
    bar.close()

    _check_weights(out, step, policy, ema)
    final = ema if ema is not None else policy
    extra = {
        "sampling": {"num_steps": cfg.sample_steps, "guidance_scale": cfg.sample_guidance},
        "pretrain": {**to_dict(cfg), "steps_done": step, "wall_seconds": round(seconds, 1)},
    }
    save_mini(final, out, dtype=_DTYPES[cfg.save_dtype], extra=extra)
    return out


def _ema_update(ema: MiniPolicy, policy: MiniPolicy, decay: float, step: int) -> None:
    # warm-up of the decay so that the EMA is not dominated by the random initialisation
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), policy.parameters()):
            e.lerp_(p, 1 - d)


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _latest_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest readable checkpoint (None: a fresh start), and the newer ones that cannot be read with why."""
    unreadable = []
    for path in reversed(sorted(_checkpoint_dir(out).glob("step_*.pt"))):
        problem = file_problem(path)
        if problem is None:
            return path, unreadable
        unreadable.append((path, problem))
    if unreadable:
        raise CheckpointError(f"no readable checkpoint in {_checkpoint_dir(out)} "
                              f"({'; '.join(f'{p.name}: {why}' for p, why in unreadable)}): delete them to start over")
    return None, []


def _diverged(out: Path, step: int, what: str) -> TrainingDivergedError:
    latest = sorted(_checkpoint_dir(out).glob("step_*.pt"))
    last = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint was written"
    return TrainingDivergedError(f"pretrain step {step}: training diverged: {what}. Stopped before checkpointing "
                                 f"it; {last} (a lower lr or grad_clip may help)")


def _check_weights(out: Path, step: int, policy: MiniPolicy, ema: MiniPolicy | None) -> None:
    for name, net in (("weights", policy), ("EMA weights", ema)):
        if net is not None:
            bad = [n for n, p in net.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise _diverged(out, step, f"{len(bad)} non-finite tensors in the {name} (e.g. {bad[0]})")


def _save_checkpoint(
    out: Path, cfg: PretrainConfig, step: int, seconds: float, policy: MiniPolicy, ema: MiniPolicy | None,
    optimizer: torch.optim.Optimizer, rng: np.random.Generator, generator: torch.Generator,
) -> None:
    state = {
        "step": step,
        "seconds": seconds,
        "model": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "torch_rng": generator.get_state(),
        "config": json.dumps(to_dict(cfg)),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    directory = _checkpoint_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"step_{step:07d}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(directory / f"step_{step:07d}.pt")  # atomic: a crash never leaves a half-written checkpoint
    for old in sorted(directory.glob("step_*.pt"))[: -max(1, cfg.keep_checkpoints)]:
        old.unlink()


def _load_checkpoint(
    path: Path, cfg: PretrainConfig, policy: MiniPolicy, ema: MiniPolicy | None,
    optimizer: torch.optim.Optimizer, rng: np.random.Generator, generator: torch.Generator,
    unreadable: list[tuple[Path, str]],
) -> tuple[int, float]:
    """Restore the checkpoint at ``path`` after checking its config against ``cfg`` (a field changed outside
    RESUME_CHANGEABLE is refused) and record the resume; ``unreadable``: newer checkpoints to set aside."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        changed, added = resume_changes(json.loads(state["config"]), cfg, RESUME_CHANGEABLE, str(path))
    except ConfigError as e:
        raise ConfigError(f"{e} (or delete {path.parent})") from None
    record_resume(Path(cfg.out), path, int(state["step"]), changed, added, unreadable)
    policy.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    generator.set_state(state["torch_rng"])
    logger.info("resuming from %s (step %s)", path, state["step"])
    return int(state["step"]), float(state["seconds"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the header and the rows up to ``step`` (rows written after the checkpoint are redone)."""
    rows = []
    if path.is_file() and step > 0:
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``pretrain CONFIG [key=value ...]`` (arguments after the subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        print("usage: python -m flowopd.train pretrain CONFIG.toml [key=value ...]\n\n" + _describe_fields())
        return 0 if args and args[0] in ("-h", "--help") else 2
    cfg = load_config(PretrainConfig, args[0], args[1:])
    out = pretrain(cfg)
    print(f"final model: {out / 'model.safetensors'}")
    return 0


def _describe_fields() -> str:
    defaults = to_dict(PretrainConfig())
    return "keys (default):\n" + "\n".join(f"  {k} = {v!r}" for k, v in defaults.items())
