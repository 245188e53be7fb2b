"""The machinery every trainer shares (GRPO, OPD, SFT): the accelerator, the policy with its LoRA adapter, the
optimizer, exact resume, logging, periodic evaluation and checkpoints.

A trainer's ``train`` is a short recipe over it::

    accelerator = make_accelerator(config, gradient_accumulation_steps)
    policy, model = build_policy(config, accelerator.device)
    run = Run.prepare(config, accelerator, policy, model, training_steps, eval_scorers)  # optimizer, EMA
    ...                                     # the reward (built before a resume restores the RNG states)
    run.begin()                             # resume, config.json, tensorboard, evaluation and probe at 0
    for iteration in run.iterations():
        ...                                 # sample, score, train (run.step counts the optimizer steps)
        run.end_iteration(iteration, metrics, t0)  # health check, checkpoint, evaluation, probe, metrics.jsonl
    return run.finish()

Checkpoints (``<output_dir>/checkpoints/iteration-NNNNNN/``): ``adapter/`` in peft format (the EMA weights
when ``ema`` is on, as Flow-GRPO saves them; ``python -m flowopd.bench evaluate DIR`` loads it), and
``state/`` with the live adapter, EMA, optimizer, scheduler, RNG states of every process and the prompt and
noise generator, from which ``resume`` continues exactly (bitwise on CPU). No file is unpickled: tensors
are safetensors or ``torch.load(weights_only=True)``, the rest JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowopd.models.loading import load_policy, model_dir
from flowopd.rewards import Reward
from flowopd.scorers.base import Scorer
from flowopd.train.config import ConfigError, RewardConfig, TrainConfig, to_dict
from flowopd.train.lora import (
    EMA,
    add_lora,
    lora_parameters,
    save_adapter,
    set_trainable_module,
    trainable_module,
    unwrap,
)
from flowopd.train.probe import Probe, check_probe
from flowopd.train.runs import (
    CheckpointError,
    check_health,
    checkpoint_problem,
    divergence_error,
    prepare_resume,
    watch_scaler,
)

#: The format of every trainer's checkpoints (GRPO, OPD and SFT write the same layout).
CHECKPOINT_FORMAT = "flowopd-grpo/1"
_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run returns: where it wrote, how far it got, its logged rows and checkpoints, the policy."""

    output_dir: Path
    iteration: int
    optimizer_step: int
    history: list[dict[str, float]]
    checkpoints: list[Path]
    policy: Any


def import_modules(modules: Sequence[str]) -> None:
    """Import a recipe's ``imports`` (this runs their code); a module that is not found is a one-line error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ConfigError(f"imports: cannot import {module!r} ({e}); is it on PYTHONPATH?") from e


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` for a while (0: left as they are), restored on exit."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_accelerator(config: TrainConfig, gradient_accumulation_steps: int) -> Any:
    """The run's accelerate ``Accelerator`` (mixed precision, accumulation, CPU), TF32 as configured, and every
    library's global seed set to ``config.seed``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=config.cpu,
        # adapters whose output does not reach the loss (the mini UNet's last text update, SD3's last text queries)
        # get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    set_seed(config.seed)
    return accelerator


def build_policy(config: TrainConfig, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """Load the base policy frozen in the run's dtype and put a float32 LoRA adapter on its velocity network (a
    probe set on a model that is not of the mini world is refused first, :func:`flowopd.train.probe.check_probe`)."""
    check_probe(config.model, config.monitor_probe_every)
    policy = load_policy(config.model, device=device, dtype=_DTYPES[config.mixed_precision])
    return policy, prepare_policy(policy, config)


def prepare_policy(policy: Any, config: TrainConfig) -> torch.nn.Module:
    """Freeze a loaded policy in the run's dtype (VAE in float32) and put the run's float32 LoRA adapter on its
    velocity network; returns the adapted network, already set back on the policy."""
    dtype = _DTYPES[config.mixed_precision]
    pipe = getattr(policy, "pipe", None)
    if hasattr(policy, "max_sequence_length"):  # SD3: T5 prompt length of rollouts and the training forward
        policy.max_sequence_length = config.max_sequence_length
    if pipe is not None:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(torch.float32)  # decoding in float32, as Flow-GRPO keeps its VAE
    else:
        trainable_module(policy).to(dtype)
    adapter = str(model_dir(config.lora_path)) if config.lora_path else None  # mini:NAME, a run or checkpoint
    model = add_lora(trainable_module(policy), config.lora_rank, config.lora_alpha, config.lora_target_modules,
                     config.lora_init, adapter_path=adapter, base_model=config.model)
    set_trainable_module(policy, model)
    return model


def build_reward(reward: RewardConfig, scorers: Mapping[str, Scorer] | None, device: torch.device) -> Reward:
    """The recipe's reward (flowopd.rewards.Reward); ``scorers`` (by scorer name) may be injected."""
    return Reward(reward.terms_by_task(), reward.scales, scorers, reward.scorer_options, reward.servers, device)


@contextlib.contextmanager
def unwrapped(policy: Any, model: torch.nn.Module) -> Iterator[None]:
    """The policy with its network out of DDP: sampling needs no gradient sync, and evaluation runs on one
    process only (a DDP forward may broadcast buffers, which would wait for the other processes)."""
    set_trainable_module(policy, unwrap(model))
    try:
        yield
    finally:
        set_trainable_module(policy, model)


def gather_stats(accelerator: Any, collected: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, float]:
    """``train/<name>`` over every process of the per-update loss statistics: the mean, or the extreme for
    ``ratio_min`` / ``ratio_max``."""
    reduce = {"ratio_min": torch.min, "ratio_max": torch.max}
    out = {}
    for k, v in collected.items():
        local = torch.stack(list(v))
        part = reduce[k](local) if k in reduce else local.mean()
        every = accelerator.gather(part.reshape(1).to(accelerator.device))
        out[f"train/{k}"] = float(reduce[k](every) if k in reduce else every.mean())
    return out


def mean_grad_norm(grad_norms: Sequence[Any]) -> dict[str, float]:
    """``train/grad_norm``: the mean of the clipped updates' gradient norms (nothing when no update synced)."""
    if not grad_norms:
        return {}
    return {"train/grad_norm": float(torch.stack([torch.as_tensor(g, dtype=torch.float32) for g in grad_norms]).mean())}


@dataclass
class Run:
    """One training run's shared state: what the iteration's end needs (checkpoint, evaluation, logs) and what a
    resume restores. Built by :meth:`prepare`; ``step`` counts optimizer steps (the trainer advances it)."""

    config: TrainConfig
    accelerator: Any
    policy: Any
    model: torch.nn.Module
    named: list[tuple[str, torch.nn.Parameter]]
    optimizer: Any
    scheduler: Any
    ema: EMA | None
    rng: np.random.Generator  # the prompt and noise generator, shared by every process
    eval_scorers: Mapping[str, Scorer] | None = None
    probe_set: Probe | None = None  # the hacking monitor's probe set (monitor_probe_every > 0)
    start: int = 0
    step: int = 0
    resumed_from: Path | None = None
    writer: Any = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checkpoints: list[Path] = dataclasses.field(default_factory=list)

    @classmethod
    def prepare(
        cls,
        config: TrainConfig,
        accelerator: Any,
        policy: Any,
        model: torch.nn.Module,
        training_steps: int,
        eval_scorers: Mapping[str, Scorer] | None = None,
    ) -> Run:
        """AdamW on the adapter, the lr schedule over ``training_steps`` optimizer steps, the model and optimizer
        through ``accelerator.prepare`` (set back on the policy), the EMA, the prompt/noise generator and the
        hacking monitor's probe set (when ``monitor_probe_every`` is set; every process builds it, rank 0 uses it)."""
        from diffusers.optimization import get_scheduler

        named = lora_parameters(model)
        optimizer = torch.optim.AdamW(
            [p for _, p in named], lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                  num_training_steps=training_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        set_trainable_module(policy, model)
        named = lora_parameters(model)
        ema = EMA(named, config.ema_decay, config.ema_update_interval) if config.ema else None
        probe = Probe(config.monitor_probe_prompts) if config.monitor_probe_every else None
        return cls(config, accelerator, policy, model, named, optimizer, scheduler, ema,
                   np.random.default_rng(config.seed), eval_scorers, probe)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def begin(self) -> None:
        """Resume from the checkpoint that ``config.resume`` names (:func:`flowopd.train.runs.prepare_resume`),
        write ``config.json``, open tensorboard, and evaluate and probe before the first iteration of a fresh run."""
        config, out_dir = self.config, self.out_dir
        self.resumed_from = prepare_resume(config, out_dir, CHECKPOINT_FORMAT)
        if self.resumed_from is not None:
            self.start, self.step = self.load_checkpoint(self.resumed_from)
        if self.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str) + "\n")
        if config.tensorboard and self.is_main_process:
            self.writer = open_writer(out_dir, self.start)
        evaluating = bool(config.eval_every and config.eval_benchmarks)
        if self.resumed_from is None and (evaluating or config.monitor_probe_every):
            metrics = self.evaluate(0) if evaluating else {}
            if config.monitor_probe_every:
                metrics.update(self.probe())
            self.history.append(self.log({"iteration": 0, **metrics}))

    def due(self, every: int, iteration: int) -> bool:
        """Whether a periodic task (``every`` iterations, 0 = never) runs after ``iteration``: at its multiples
        and at the last iteration."""
        return bool(every) and (iteration % every == 0 or iteration == self.config.num_iterations)

    def iterations(self) -> range:
        """The iterations still to run (1-based)."""
        return range(self.start + 1, self.config.num_iterations + 1)

    def progress_bar(self, desc: str) -> Any:
        """A tqdm bar over the run's iterations (shown on the local main process when ``progress`` is on)."""
        from tqdm.auto import tqdm

        return tqdm(total=self.config.num_iterations, initial=self.start, desc=desc, unit="it",
                    disable=not (self.config.progress and self.accelerator.is_local_main_process))

    def end_iteration(self, iteration: int, metrics: dict[str, Any], t0: float) -> dict[str, float]:
        """The tail every training loop shares: the checkpoint, the evaluation and the probe when due, then the
        iteration's metrics logged (tensorboard, metrics.jsonl) and kept in ``history``; returns the logged row. An
        iteration that diverged (:func:`flowopd.train.runs.check_health`) is logged, then stops the run before its
        checkpoint."""
        config, out_dir = self.config, self.out_dir
        problem = check_health(metrics, self.named, self.ema, self.accelerator.scaler, self.step)
        if problem:
            metrics.update({"iteration": iteration, "optimizer_step": self.step})
            self.log(metrics)
            raise divergence_error(problem, iteration, out_dir)
        if self.due(config.save_every, iteration):
            path = out_dir / "checkpoints" / f"iteration-{iteration:06d}"
            self.save_checkpoint(path, {"iteration": iteration, "optimizer_step": self.step})
            self.checkpoints.append(path)
        if config.eval_benchmarks and self.due(config.eval_every, iteration):
            metrics.update(self.evaluate(iteration))
        if self.due(config.monitor_probe_every, iteration):
            metrics.update(self.probe())
        metrics.update({"iteration": iteration, "optimizer_step": self.step,
                        "time/iteration_s": time.perf_counter() - t0})
        row = self.log(metrics)
        self.history.append(row)
        return row

    def finish(self) -> TrainResult:
        """Close tensorboard, wait for every process, and return the run's result."""
        self.close()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.out_dir, max(self.start, self.config.num_iterations), self.step, self.history,
                           self.checkpoints, self.policy)

    def close(self) -> None:
        """Close tensorboard's writer (also when the loop stopped on an error)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ------------------------------------------------------------ logging and evaluation

    def log(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Write one row to tensorboard and ``metrics.jsonl`` (main process; non-finite values as null)."""
        row = {k: float(v) for k, v in metrics.items()}
        if self.is_main_process:
            it = int(row.get("iteration", 0))
            if self.writer is not None:
                for k, v in row.items():
                    if k != "iteration" and math.isfinite(v):
                        self.writer.add_scalar(k, v, it)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: (v if math.isfinite(v) else None) for k, v in row.items()}) + "\n")
        return row

    def evaluate(self, iteration: int) -> dict[str, float]:
        """Every metric (``mean`` and per tag) of the evaluation benchmarks (flowopd.bench.evaluate) with the
        EMA weights, main process only."""
        # imported here: seconds of imports (scorers, diffusers) that a run without evaluation does not pay
        from flowopd.bench.evaluate import evaluate

        config, metrics = self.config, {}
        if self.is_main_process:
            t0 = time.perf_counter()
            with self.sampling_model(), self.ema_applied():
                results = evaluate(
                    checkpoint=None, policy=self.policy, benchmarks=config.eval_benchmarks,
                    out=self.out_dir / "eval" / f"iteration-{iteration:06d}", limit=config.eval_limit,
                    batch_size=config.eval_batch_size, device=str(self.accelerator.device),
                    scorers=self.eval_scorers, progress=False, log=lambda _: None,
                )
            for name, record in results["benchmarks"].items():
                for metric, value in record["metrics"].items():
                    metrics[f"eval/{name}/{metric}"] = float(value["value"])
            metrics["time/eval_s"] = time.perf_counter() - t0
        self.accelerator.wait_for_everyone()
        return metrics

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        """The network unwrapped (:func:`unwrapped`) and in eval mode for a while, then back in the mode it was in:
        what the evaluation and the probe sample with."""
        training = self.model.training
        self.model.eval()
        try:
            with unwrapped(self.policy, self.model):
                yield
        finally:
            self.model.train(training)

    def probe(self) -> dict[str, float]:
        """The hacking monitor's probe set (:mod:`flowopd.train.probe`) sampled with the live adapter and scored:
        ``monitor/probe/<benchmark>`` and ``time/probe_s``, main process only. The network is unwrapped, in eval
        mode without autograd, and goes back to the mode it was in; nothing draws from a global generator."""
        metrics: dict[str, float] = {}
        if self.is_main_process and self.probe_set is not None:
            t0 = time.perf_counter()
            with self.sampling_model(), torch.no_grad():
                metrics = self.probe_set(self.policy)
            metrics["time/probe_s"] = time.perf_counter() - t0
        self.accelerator.wait_for_everyone()
        return metrics

    def ema_applied(self) -> contextlib.AbstractContextManager[Any]:
        """The EMA weights in the adapter for a while (nothing without EMA)."""
        return self.ema.applied(self.named) if self.ema is not None else contextlib.nullcontext()

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path, counters: Mapping[str, int]) -> Path:
        """Write the checkpoint into ``path`` atomically (a temporary directory renamed at the end)."""
        from safetensors.torch import save_file

        accelerator = self.accelerator
        tmp = path.with_name(path.name + ".tmp")
        state = tmp / "state"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            state.mkdir(parents=True)
            with self.ema_applied():
                save_adapter(self.model, tmp / "adapter")
            save_file({n: p.detach().cpu().contiguous() for n, p in self.named},
                      str(state / "adapter_live.safetensors"))
            if self.ema is not None:
                save_file({n: t.cpu().contiguous() for n, t in self.ema.state_dict().items()},
                          str(state / "ema.safetensors"))
            torch.save(self.optimizer.state_dict(), state / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), state / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), state / "scaler.pt")
            trainer = {"format": CHECKPOINT_FORMAT, **counters, "num_processes": accelerator.num_processes,
                       "sampler_rng": self.rng.bit_generator.state, "config": to_dict(self.config)}
            (state / "trainer.json").write_text(json.dumps(trainer, indent=1, default=str) + "\n")
        accelerator.wait_for_everyone()
        save_rng_state(state, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns (iteration, optimizer step)."""
        from safetensors.torch import load_file

        accelerator = self.accelerator
        state = path / "state"
        problem = checkpoint_problem(path, CHECKPOINT_FORMAT)
        if problem:
            raise CheckpointError(f"{path}: the checkpoint cannot be read: {problem}")
        trainer = json.loads((state / "trainer.json").read_text())
        live = load_file(str(state / "adapter_live.safetensors"))
        names = [n for n, _ in self.named]
        if sorted(live) != sorted(names):
            raise CheckpointError(f"{state / 'adapter_live.safetensors'}: adapter weights "
                                  f"{sorted(set(live) ^ set(names))[:4]} do not match the model's adapter (different "
                                  f"lora_rank/targets/model?)")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(live[n])
        if self.ema is not None:
            ema_file = state / "ema.safetensors"
            if not ema_file.is_file():
                raise CheckpointError(f"{ema_file} missing: the checkpoint was written with ema = false")
            self.ema.load_state_dict(load_file(str(ema_file)))
        self.optimizer.load_state_dict(torch.load(state / "optimizer.pt", map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(state / "scheduler.pt", map_location="cpu", weights_only=True))
        if accelerator.scaler is not None and (state / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(state / "scaler.pt", weights_only=True))
        watch_scaler(accelerator.scaler, int(trainer["optimizer_step"]))
        self.rng.bit_generator.state = trainer["sampler_rng"]
        if trainer.get("num_processes") != accelerator.num_processes:
            logger.warning(f"resume: checkpoint from {trainer.get('num_processes')} processes, running "
                           f"{accelerator.num_processes}: global RNG states restored from process 0")
        rank = accelerator.process_index if (state / f"rng_{accelerator.process_index}.json").is_file() else 0
        load_rng_state(state, rank)
        return int(trainer["iteration"]), int(trainer["optimizer_step"])


def open_writer(out_dir: Path, start: int) -> Any:
    """A tensorboard writer on ``<out_dir>/tensorboard``; a resumed run drops the events after ``start``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - tensorboard is in the train and dev extras
        raise ImportError("tensorboard logging needs `pip install tensorboard` (or set tensorboard = false)") from e
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start + 1 if start else None)


def save_rng_state(state: Path, rank: int) -> None:
    """This process's torch (CPU and CUDA), numpy and Python RNG states into ``state/rng_<rank>.*``."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(state / f"rng_{rank}.safetensors"))
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    (state / f"rng_{rank}.json").write_text(json.dumps({
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }))


def load_rng_state(state: Path, rank: int) -> None:
    """Restore the RNG states that :func:`save_rng_state` wrote for process ``rank``."""
    from safetensors.torch import load_file

    tensors = load_file(str(state / f"rng_{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved = json.loads((state / f"rng_{rank}.json").read_text())
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))
