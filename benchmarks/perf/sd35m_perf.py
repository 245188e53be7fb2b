"""Throughput and memory of SD3.5-Medium-sized sampling and of one GRPO step, on random weights.

``python benchmarks/perf/sd35m_perf.py --out reports/perf.md`` (on a GPU; see benchmarks/perf/README.md).

What is measured, in one process, with warm-up runs excluded and the device synchronised around every timing:

1. Images per second of 40-step, CFG 4.5, 512x512 sampling (VAE decode included) by our sampler
   (:func:`flowopd.sampling.sample_ode` through :class:`flowopd.models.sd3.SD3Policy`) and by diffusers' stock
   ``StableDiffusion3Pipeline`` on the *same* transformer, VAE, scheduler, conditioning and starting noise, and
   their ratio. The stock pipeline is called with ``output_type="pt"``: it decodes with the same VAE and maps
   to [0, 1] as ``SD3Policy.decode`` does (no PIL conversion), so both do the same denoising + decode work. The
   two samplers take turns (and turns at going first), so that clock or thermal drift hits both alike. With
   ``--compile``, both again with the shared transformer under ``torch.compile`` (the first, compiling call
   timed apart), with the ratios to the uncompiled and to the compiled stock pipeline.
2. One GRPO step as the trainer runs it (:mod:`flowopd.train.grpo`): the rollout (SDE sampling of a group with
   log-probs, 10 steps, through the trainer's ``_rollout``) timed apart from the training step (the trainer's
   ``_train_iteration`` on that group as one micro-batch: at each trained step the forward with gradient, the
   reference forward with the adapter disabled, ``grpo_loss``, backward; then grad-norm clipping and one AdamW
   step), plus the peak CUDA memory of each phase.

The weights are random (no checkpoint is downloaded) with SD3.5-Medium's published configuration. Text encoders
are not built: both samplers and the rollout get the same random prompt embeddings of SD3's shapes
(CLIP-L/G 77 tokens + T5 256 tokens = 333 x 4096, pooled 2048), so text encoding is excluded from every number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from flowopd.models.policy import Conditioning  # noqa: E402
from flowopd.models.sd3 import SD3Policy  # noqa: E402
from flowopd.sampling import sample_ode  # noqa: E402

#: ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium (MMDiT-X: its first 13 blocks add a
#: second, image-only attention ``attn2``), as keyword arguments of diffusers' ``SD3Transformer2DModel``
#: (every key is a parameter of its ``__init__``; tests/test_perf_script.py checks the built model). 24 heads x
#: 64 = 1536 = caption_projection_dim; about 2.24 B parameters.
SD35M_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

#: ``vae/config.json`` of the same repository: SD3's 16-channel AutoencoderKL (8x downsampling), with SD3's
#: latent scaling and shift factors.
SD35M_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

#: ``scheduler/scheduler_config.json``: FlowMatchEulerDiscreteScheduler with shift 3.0, no dynamic shifting.
SCHEDULER_SHIFT = 3.0

#: Joint text sequence of SD3: 77 CLIP tokens + 256 T5 tokens (``SD3Policy``'s and the pipeline's
#: ``max_sequence_length``).
SD3_TEXT_TOKENS = 77 + 256

#: A two-layer SD3.5-M look-alike (dual attention in block 0, RMS qk-norm, 16 latent channels) for CPU smoke tests.
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
TINY_VAE: dict[str, Any] = {
    **SD35M_VAE,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
}


@dataclass(frozen=True)
class ModelSize:
    """A model configuration and the defaults that fit it."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_tokens: int
    resolution: int
    batch: int
    grpo_group: int


SIZES: dict[str, ModelSize] = {
    # batch 8: flowopd.bench's default sampling batch; group 4: a GRPO micro-batch estimated (README) to fit 80 GB
    "sd35m": ModelSize(SD35M_TRANSFORMER, SD35M_VAE, SD3_TEXT_TOKENS, resolution=512, batch=8, grpo_group=4),
    "tiny": ModelSize(TINY_TRANSFORMER, TINY_VAE, text_tokens=12, resolution=32, batch=2, grpo_group=2),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: accelerate's mixed_precision for each dtype, as GRPOConfig.mixed_precision names it.
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def build_transformer(size: ModelSize, device: torch.device | str) -> torch.nn.Module:
    """The random-weight float32 transformer of ``size``, built directly on ``device`` ("meta" allocates nothing)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        return SD3Transformer2DModel(**size.transformer)


def build_pipeline(size: ModelSize, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A StableDiffusion3Pipeline with random transformer and VAE in ``dtype`` on ``device``, no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = build_transformer(size, device).to(dtype)
    with torch.device(device):
        vae = AutoencoderKL(**size.vae).to(dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RandomTextSD3Policy(SD3Policy):
    """SD3Policy whose text encoders are replaced by fixed random prompt embeddings of SD3's shapes.

    Row ``i`` of every batch gets the same embeddings, whatever the prompt; the negative (empty) prompt has one
    embedding. Everything else (velocity with CFG, noise, schedule, decode) is SD3Policy's own.
    """

    def __init__(self, pipe: Any, text_tokens: int, rows: int, seed: int = 0) -> None:
        super().__init__(pipe)
        config = pipe.transformer.config
        g = torch.Generator("cpu").manual_seed(seed)

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=g).to(self.device, self.dtype)

        self.rows = rows
        self.table: Conditioning = {
            "embeds": draw(rows, text_tokens, config.joint_attention_dim),
            "pooled": draw(rows, config.pooled_projection_dim),
            "neg_embeds": draw(1, text_tokens, config.joint_attention_dim).repeat(rows, 1, 1),
            "neg_pooled": draw(1, config.pooled_projection_dim).repeat(rows, 1),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        n = len(prompts)
        if n > self.rows:
            raise ValueError(f"RandomTextSD3Policy holds embeddings for {self.rows} prompts, asked for {n}")
        return {k: v[:n] for k, v in self.table.items()}


@dataclass
class PerfResult:
    """What one run measured, its markdown report, and the policy it ran (with the LoRA adapter after GRPO)."""

    measurements: dict[str, Any]
    markdown: str
    policy: RandomTextSD3Policy
    model: torch.nn.Module | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` took on ``device`` (queued CUDA work finished before and after) and its result."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory allocated by tensors since the last reset, GiB; NaN off CUDA (not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


@contextlib.contextmanager
def compiled_transformer(policy: RandomTextSD3Policy, backend: str, mode: str | None) -> Iterator[None]:
    """Both samplers call ``torch.compile`` of the shared transformer inside the block, the eager module after it."""
    pipe, eager = policy.pipe, policy.transformer
    compiled = torch.compile(eager, backend=backend, mode=mode)
    policy.transformer = pipe.transformer = compiled
    try:
        yield
    finally:
        policy.transformer = pipe.transformer = eager


def time_samplers(
    runners: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Warm-up runs, then ``args.repeats`` timed runs of every sampler, taking turns; images/s and peak memory."""
    for _ in range(args.warmup):
        for fn in runners.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    peaks = dict.fromkeys(runners, math.nan)
    images: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = list(runners.items())
        for name, fn in order[r % 2 :] + order[: r % 2]:  # alternated, so that drift hits both samplers alike
            reset_peak(device)
            dt, images[name] = timed(fn, device)
            seconds[name].append(dt)
            peaks[name] = np.fmax(peaks[name], peak_gib(device))
    out: dict[str, Any] = {}
    for name in runners:
        total = sum(seconds[name])
        out[f"{name}_s_per_batch"] = total / args.repeats
        out[f"{name}_images_per_s"] = args.batch * args.repeats / total
        out[f"{name}_peak_gib"] = float(peaks[name])
    return out, images


def measure_sampling(policy: RandomTextSD3Policy, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images/s of our sampler and of the stock pipeline on the same model, conditioning and noise; with
    ``--compile`` again with the transformer compiled (the first call of each, compilation included, timed apart)."""
    pipe = policy.pipe
    cond = policy.encode_prompts(["benchmark prompt"] * args.batch)
    noise = policy.initial_noise(list(range(args.batch)), args.resolution, args.resolution)

    def ours() -> torch.Tensor:
        return sample_ode(policy, cond, noise, args.steps, args.guidance)

    def stock() -> torch.Tensor:
        return pipe(
            prompt_embeds=cond["embeds"],
            negative_prompt_embeds=cond["neg_embeds"],
            pooled_prompt_embeds=cond["pooled"],
            negative_pooled_prompt_embeds=cond["neg_pooled"],
            latents=noise,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="pt",
            return_dict=False,
        )[0]

    runners = {"ours": ours} if args.skip_stock else {"ours": ours, "stock": stock}
    out, images = time_samplers(runners, args, device)
    if "stock" in runners:
        out["ratio_ours_over_stock"] = out["ours_images_per_s"] / out["stock_images_per_s"]
        # the same work: both samplers map the same noise to the same images (up to rounding)
        out["max_abs_image_diff"] = float((images["ours"].float() - images["stock"].float()).abs().max())
    if args.compile:
        with compiled_transformer(policy, args.compile_backend, args.compile_mode):
            for name, fn in runners.items():  # compilation happens in the first call (and again if a guard fails)
                out[f"{name}_compiled_first_call_s"], _ = timed(fn, device)
            compiled, compiled_images = time_samplers({f"{n}_compiled": fn for n, fn in runners.items()}, args,
                                                      device)
        out.update(compiled)
        out["ratio_ours_compiled_over_ours"] = out["ours_compiled_images_per_s"] / out["ours_images_per_s"]
        # compiled kernels round differently: how far from the eager images (bf16 noise is ~1e-2)
        out["max_abs_image_diff_compiled"] = float(
            (compiled_images["ours_compiled"].float() - images["ours"].float()).abs().max())
        if "stock" in runners:
            out["ratio_ours_compiled_over_stock"] = out["ours_compiled_images_per_s"] / out["stock_images_per_s"]
            out["ratio_ours_compiled_over_stock_compiled"] = (
                out["ours_compiled_images_per_s"] / out["stock_compiled_images_per_s"])
    return out


def measure_grpo_step(
    policy: RandomTextSD3Policy, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Rollout and training step of one GRPO group, through the trainer's own functions (flowopd.train.grpo, and
    the shared runtime's optimizer set-up, flowopd.train.runtime)."""
    from accelerate import Accelerator

    from flowopd.rewards import ANY_TASK
    from flowopd.train.grpo import (
        GRPOConfig,
        IterationPlan,
        compute_advantages,
        micro_batches,
        rollout,
        train_iteration,
    )
    from flowopd.train.rollout import sde_window, trained_positions
    from flowopd.train.runtime import Run, prepare_policy

    group = args.grpo_group
    # the published SD3.5-M recipe (GRPOConfig's defaults), one group of `group` samples as one micro-batch
    config = GRPOConfig(model="random-weights", seed=args.seed, mixed_precision=MIXED_PRECISION[args.dtype],
                        resolution=args.resolution, num_steps=args.grpo_steps, guidance_scale=args.guidance,
                        group_size=group, prompts_per_iteration=1, sample_batch_size=group,
                        updates_per_iteration=1, ema=False, tensorboard=False, progress=False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    model = prepare_policy(policy, config)  # as the trainer: frozen base, float32 VAE, float32 LoRA

    n_train = len(trained_positions(config.num_steps, config.num_steps, config.timestep_fraction, False))
    # one optimizer step per micro-batch, accumulated over its trained steps, as flowopd.train.grpo.train sets it
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=n_train,
                              cpu=device.type == "cpu")
    if (accelerator.device.type, accelerator.device.index or 0) != (device.type, device.index or 0):  # cuda == cuda:0
        raise RuntimeError(f"the GRPO step runs on accelerate's device {accelerator.device}, not --device {device}; "
                           f"pass --device {accelerator.device} or set CUDA_VISIBLE_DEVICES")
    # AdamW on the adapter and the constant schedule, prepared by accelerate, as the trainer sets them up
    train_run = Run.prepare(config, accelerator, policy, model, training_steps=args.warmup + args.repeats)
    model, named = train_run.model, train_run.named

    rng = np.random.default_rng(args.seed)
    local = np.arange(group)
    rollout_s, train_s, stats = [], [], {}
    peaks = {"rollout": math.nan, "train": math.nan}
    before: dict[str, torch.Tensor] = {}
    for i in range(args.warmup + args.repeats):
        timing = i >= args.warmup
        plan = IterationPlan(
            metas=[{"prompt": "benchmark prompt", "task": ANY_TASK}] * group,
            group_ids=np.zeros(group, dtype=np.int64),
            noise_seeds=rng.integers(0, 2**31 - 1, size=group),
            sde_seeds=rng.integers(0, 2**31 - 1, size=group),
            sde_steps=sde_window(config.num_steps, config.sde_window_size, config.sde_window_range, rng),
            shuffle_seed=int(rng.integers(0, 2**31 - 1)),
        )
        reset_peak(device)
        dt, (traj, cond, _, _) = timed(lambda plan=plan: rollout(config, policy, model, plan, local, None, None),
                                       device)
        if timing:
            rollout_s.append(dt)
            peaks["rollout"] = np.fmax(peaks["rollout"], peak_gib(device))
        # random rewards: a group with distinct rewards, so that every sample carries a policy gradient
        adv, keep = compute_advantages(rng.standard_normal(group), plan.group_ids, config.adv_clip_max,
                                       config.advantage_std)
        batches = micro_batches(keep, 1, rng)
        if timing and not before:
            before = {n: p.detach().clone() for n, p in named}
        reset_peak(device)
        dt, stats = timed(
            lambda traj=traj, cond=cond, adv=adv, batches=batches: train_iteration(
                train_run, traj, cond, torch.as_tensor(adv), batches),
            device)
        if timing:
            train_s.append(dt)
            peaks["train"] = np.fmax(peaks["train"], peak_gib(device))
        del traj, cond
    lora_update = max(float((p.detach() - before[n]).abs().max()) for n, p in named)
    return {
        "grpo_group": group,
        "grpo_steps": config.num_steps,
        "grpo_trained_steps": n_train,
        "grpo_beta": config.beta,
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_parameters": sum(p.numel() for _, p in named),
        "rollout_s": sum(rollout_s) / len(rollout_s),
        "rollout_peak_gib": float(peaks["rollout"]),
        "train_step_s": sum(train_s) / len(train_s),
        "train_peak_gib": float(peaks["train"]),
        "train_loss": stats.get("train/loss", math.nan),
        "train_grad_norm": stats.get("train/grad_norm", math.nan),
        "lora_update_max_abs": lora_update,
    }, model


def run(args: argparse.Namespace) -> PerfResult:
    """Build the model, run the measurements asked for, and render the report."""
    device, dtype, size = torch.device(args.device), DTYPES[args.dtype], SIZES[args.config]
    t0 = time.perf_counter()
    pipe = build_pipeline(size, device, dtype, args.seed)
    policy = RandomTextSD3Policy(pipe, size.text_tokens, max(args.batch, args.grpo_group), args.seed)
    m: dict[str, Any] = {
        **environment(device),
        "config": args.config, "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
        "resolution": args.resolution, "guidance": args.guidance, "repeats": args.repeats, "warmup": args.warmup,
        "text_tokens": size.text_tokens, "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "build_s": time.perf_counter() - t0,
    }
    _log(f"built {args.config} on {m['device_name']} in {m['build_s']:.1f} s")
    m.update(measure_sampling(policy, args, device))
    _log(f"sampling: ours {m['ours_images_per_s']:.4g} images/s, stock {m.get('stock_images_per_s', math.nan):.4g}")
    if args.compile:
        _log(f"compiled: ours {m['ours_compiled_images_per_s']:.4g} images/s, "
             f"stock {m.get('stock_compiled_images_per_s', math.nan):.4g}")
    model = None
    if not args.skip_grpo:
        try:
            grpo, model = measure_grpo_step(policy, args, device)
            m.update(grpo)
        except torch.cuda.OutOfMemoryError as e:  # keep the sampling numbers; the report says what failed
            m["grpo_error"] = (f"out of memory with --grpo-group {args.grpo_group} "
                               f"({str(e).splitlines()[0]}); try a smaller group")
        _log(f"GRPO: rollout {m.get('rollout_s', math.nan):.4g} s, "
             f"training step {m.get('train_step_s', math.nan):.4g} s")
    return PerfResult(m, render_markdown(m, args.command), policy, model)


def environment(device: torch.device) -> dict[str, Any]:
    import accelerate
    import diffusers
    import peft

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda or "-",
        "diffusers": diffusers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "cpu_threads": torch.get_num_threads(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def render_markdown(m: dict[str, Any], command: str) -> str:
    """The report: device, versions, configuration, measurements, the command that produced them."""
    res = f"{m['resolution']}x{m['resolution']}"
    lines = [
        "# Performance: SD3.5-Medium-sized sampling and GRPO step",
        "",
        f"- Device: **{m['device_name']}** (`{m['device']}`, {m['cpu_threads']} CPU threads)",
        f"- torch {m['torch']} (CUDA {m['cuda']}), diffusers {m['diffusers']}, peft {m['peft']}, "
        f"accelerate {m['accelerate']}; flowopd commit {m['commit']}; {m['date']}",
        f"- Model: `--config {m['config']}`, random weights, {m['dtype']}: transformer "
        f"{_fmt(m['transformer_parameters'])} parameters, VAE {_fmt(m['vae_parameters'])}; text encoders not "
        f"run (random prompt embeddings, {m['text_tokens']} tokens)",
        f"- Command: `{command}`",
        "",
        f"## Sampling: {m['steps']} steps, CFG {m['guidance']}, {res}, batch {m['batch']}, VAE decode included",
        "",
        f"Mean of {m['repeats']} timed batches per sampler after {m['warmup']} warm-up batch(es); "
        "the samplers take turns.",
        "",
        "| sampler | s / batch | images / s | peak memory allocated (GiB, weights included) |",
        "|---|---|---|---|",
        f"| ours: `flowopd.sampling.sample_ode` + `SD3Policy` | {_fmt(m['ours_s_per_batch'])} | "
        f"{_fmt(m['ours_images_per_s'])} | {_fmt(m['ours_peak_gib'])} |",
    ]
    if "stock_images_per_s" in m:
        lines += [
            f"| diffusers `StableDiffusion3Pipeline` (`output_type=\"pt\"`) | {_fmt(m['stock_s_per_batch'])} | "
            f"{_fmt(m['stock_images_per_s'])} | {_fmt(m['stock_peak_gib'])} |",
            "",
            f"**Ratio ours / stock (images/s): {m['ratio_ours_over_stock']:.3f}**. Largest pixel difference "
            f"between the two samplers' images from the same noise: {m['max_abs_image_diff']:.3g} (of 1).",
        ]
    else:
        lines += ["", "Stock pipeline skipped (`--skip-stock`): no ratio."]
    if "ours_compiled_images_per_s" in m:
        lines += _compiled_lines(m)
    if "grpo_error" in m:
        lines += ["", "## GRPO step", "", f"Failed: {m['grpo_error']}."]
    elif "train_step_s" in m:
        lines += [
            "",
            f"## One GRPO step: group {m['grpo_group']}, {m['grpo_steps']} SDE steps, {res}, CFG {m['guidance']}",
            "",
            f"Base weights {m['dtype']} (frozen), LoRA rank {m['lora_rank']} alpha {_fmt(m['lora_alpha'])} in "
            f"float32 on the published targets ({_fmt(m['lora_parameters'])} parameters), VAE float32, KL beta "
            f"{m['grpo_beta']}. Mean of {m['repeats']} timed steps after {m['warmup']} warm-up step(s); peak "
            f"memory reset before each phase.",
            "",
            "| phase | s | peak memory allocated (GiB, weights included) |",
            "|---|---|---|",
            f"| rollout: SDE sampling of the group with log-probs + decode | {_fmt(m['rollout_s'])} | "
            f"{_fmt(m['rollout_peak_gib'])} |",
            f"| training step: {m['grpo_trained_steps']} x (forward with grad + reference forward, adapter "
            f"disabled + `grpo_loss` + backward), clip, AdamW | {_fmt(m['train_step_s'])} | "
            f"{_fmt(m['train_peak_gib'])} |",
            "",
            f"Checks: loss {_fmt(m['train_loss'])}, grad norm {_fmt(m['train_grad_norm'])}, largest LoRA weight "
            f"change over the timed steps {_fmt(m['lora_update_max_abs'])}.",
        ]
    return "\n".join(lines) + "\n"


def _compiled_lines(m: dict[str, Any]) -> list[str]:
    """The ``--compile`` section: both samplers with the transformer compiled, and the ratios of the issue."""
    lines = [
        "",
        f"## Sampling with the transformer compiled (`torch.compile`, backend {m['compile_backend']}, mode "
        f"{m['compile_mode'] or 'default'})",
        "",
        "Same batches, noise and timing as above; the first call of each sampler (compilation included) is timed "
        "apart and is not in the mean.",
        "",
        "| sampler | first call s (compile) | s / batch | images / s | peak memory allocated (GiB, weights included) |",
        "|---|---|---|---|---|",
        f"| ours, compiled | {_fmt(m['ours_compiled_first_call_s'])} | {_fmt(m['ours_compiled_s_per_batch'])} | "
        f"{_fmt(m['ours_compiled_images_per_s'])} | {_fmt(m['ours_compiled_peak_gib'])} |",
    ]
    if "stock_compiled_images_per_s" in m:
        lines.append(
            f"| diffusers `StableDiffusion3Pipeline`, compiled | {_fmt(m['stock_compiled_first_call_s'])} | "
            f"{_fmt(m['stock_compiled_s_per_batch'])} | {_fmt(m['stock_compiled_images_per_s'])} | "
            f"{_fmt(m['stock_compiled_peak_gib'])} |")
    lines += ["", f"- Ratio ours compiled / ours uncompiled (images/s): {m['ratio_ours_compiled_over_ours']:.3f}"]
    if "ratio_ours_compiled_over_stock" in m:
        lines += [
            f"- **Ratio ours compiled / stock uncompiled (images/s): {m['ratio_ours_compiled_over_stock']:.3f}** "
            "(goal of issue 22: >= 1.25)",
            f"- Ratio ours compiled / stock compiled (images/s): {m['ratio_ours_compiled_over_stock_compiled']:.3f}",
        ]
    lines.append(f"- Largest pixel difference between our compiled and uncompiled images from the same noise: "
                 f"{m['max_abs_image_diff_compiled']:.3g} (of 1)")
    return lines


def _log(text: str) -> None:
    print(f"[sd35m_perf] {text}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/perf/sd35m_perf.py",
        description="Images/s of our sampler vs diffusers' stock SD3 pipeline, and time and peak memory of one "
                    "GRPO step, on a random-weight SD3.5-Medium-sized model.",
    )
    parser.add_argument("--config", choices=sorted(SIZES), default="sd35m",
                        help="sd35m: SD3.5-Medium's published sizes; tiny: a few-layer model for smoke tests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=None, help="images per sampling batch (sd35m: 8)")
    parser.add_argument("--steps", type=int, default=40, help="sampling steps (evaluation: 40)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (sd35m: 512)")
    parser.add_argument("--guidance", type=float, default=4.5, help="CFG scale (SD3.5-M: 4.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--grpo-group", type=int, default=None,
                        help="samples of the GRPO group, sampled and trained as one micro-batch (sd35m: 4)")
    parser.add_argument("--grpo-steps", type=int, default=10, help="SDE steps of the rollout (published: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-stock", action="store_true", help="do not run diffusers' pipeline")
    parser.add_argument("--skip-grpo", action="store_true", help="do not measure the GRPO step")
    parser.add_argument("--compile", action="store_true",
                        help="also time both samplers with the transformer under torch.compile (compile time apart)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode (default: torch's default)")
    parser.add_argument("--allow-cpu", action="store_true", help="let --config sd35m run on CPU (hours)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    size = SIZES[args.config]
    args.batch = args.batch or size.batch
    args.resolution = args.resolution or size.resolution
    args.grpo_group = args.grpo_group or size.grpo_group
    args.command = shlex.join(["python", "benchmarks/perf/sd35m_perf.py", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # the index accelerate will pick
    args.device = str(device)
    if args.config == "sd35m" and device.type == "cpu" and not args.allow_cpu:
        parser.error("--config sd35m on cpu would take hours (a 2.2 B-parameter transformer, 40 steps at 512 px, "
                     "a GRPO backward pass): run it on a GPU (--device cuda), use --config tiny for a smoke test, "
                     "or pass --allow-cpu")
    for name in ("batch", "steps", "resolution", "repeats", "grpo_group", "grpo_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.compile and (args.compile_backend or args.compile_mode):
        parser.error("--compile-backend and --compile-mode need --compile")
    args.compile_backend = args.compile_backend or "inductor"
    if args.compile and args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f"--compile-backend {args.compile_backend!r} is not a torch.compile backend; known: "
                     f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    multiple = 2 ** (len(size.vae["block_out_channels"]) - 1) * size.transformer["patch_size"]
    if args.resolution % multiple:
        parser.error(f"--resolution must be a multiple of {multiple} (VAE downsampling x patch size), "
                     f"got {args.resolution}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(result.markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result.markdown)
        _log(f"wrote {args.out}")
    return 1 if "grpo_error" in result.measurements else 0


if __name__ == "__main__":
    sys.exit(main())
