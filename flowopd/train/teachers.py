"""The teachers of on-policy distillation and the SFT cold start: LoRA adapters on the student's own base network,
and the router that picks each prompt's teacher by its task (METHOD.md s.2).

**One base network.** Student, teachers and anchor are LoRA adapters on one frozen base network: each
teacher adapter is loaded under its own adapter name (peft multi-adapter, :class:`TeacherSet`), the router
switches the active adapter, and the anchor ``"base"`` is the base with every adapter disabled. The public
code holds one more full transformer per teacher, in float32. The memory saved on the frozen networks is

    saved = N * P_base * 4 bytes - sum_k P_k * b_k

with ``N`` the frozen networks besides the student (one per distinct teacher adapter, plus the anchor when it
is an adapter of its own), ``P_base`` the parameters of the velocity network (SD3.5-M's transformer:
2.243e9, 8.97 GB per float32 copy), ``P_k`` the parameters of adapter ``k`` (rank 32 on SD3.5-M's attention
projections: 18.8e6, 75 MB in float32) and ``b_k`` its bytes per parameter. With the paper's four teachers
and the base as anchor: 35.9 GB of copies against 0.3 GB of adapters, 35.6 GB saved (counted on the
transformer built from SD3.5-M's config on the meta device). OPD logs it at start-up and writes it to
``<output_dir>/memory.json`` (:func:`shared_base_memory`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from flowopd.models.loading import adapter_base, checkpoint_dir, model_dir
from flowopd.models.policy import Conditioning, index_cond
from flowopd.train.config import ConfigError
from flowopd.train.grpo import GRPOConfig
from flowopd.train.lora import set_trainable_module, trainable_module, unwrap
from flowopd.train.rollout import step_log_prob

#: The anchor value meaning "the base network with every adapter disabled".
BASE_ANCHOR = "base"


def route_to_teacher(metadata: Mapping[str, Any], teachers: Mapping[str, str]) -> str:
    """The adapter name of the teacher of the prompt's task (``metadata["task"]``): one-hot routing, METHOD.md s.2."""
    task = metadata.get("task")
    if task not in teachers:
        raise KeyError(
            f"no teacher for task {task!r} (prompt {metadata.get('prompt')!r}); the recipe has teachers for "
            f"{sorted(teachers)}: add teachers.{task} = ADAPTER_DIR or give the prompt source another task"
        )
    return teachers[task]


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Run ``model`` with adapter ``name`` active (``None``: every adapter disabled, the base network).

    peft's ``set_adapter`` also makes the adapter it activates trainable; the ``requires_grad`` flags are
    restored on exit, so the student stays the only trainable adapter.
    """
    peft_model = unwrap(model)
    if name is None:
        with peft_model.disable_adapter():
            yield
        return
    previous = peft_model.active_adapter
    flags = [(p, p.requires_grad) for n, p in peft_model.named_parameters() if ".lora_" in n]
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _plain_module(policy: Any, model: torch.nn.Module) -> Iterator[None]:
    """The policy's velocity network out of its DDP wrapper for a while (restoring whatever was there)."""
    previous = trainable_module(policy)
    set_trainable_module(policy, unwrap(model))
    try:
        yield
    finally:
        set_trainable_module(policy, previous)


def shared_base_memory(model: torch.nn.Module, adapters: Sequence[str]) -> dict[str, float]:
    """Memory of the frozen networks ``adapters`` kept as adapters on the student's base, against one full
    float32 copy of the velocity network each (the public code's layout); see the module docstring.

    Returns the counts and bytes: ``base_parameters`` (P_base, LoRA weights excluded), ``copies`` (N),
    ``full_copies_bytes`` (N * P_base * 4), ``adapter_parameters`` and ``adapter_bytes`` (sum over the
    adapters), ``saved_bytes`` (the difference).
    """
    peft_model = unwrap(model)
    base = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" not in n)
    params = bytes_ = 0
    for name in adapters:
        own = [p for n, p in peft_model.named_parameters() if f".{name}." in n and ".lora_" in n]
        if not own:
            raise KeyError(f"shared_base_memory: the model has no adapter named {name!r}")
        params += sum(p.numel() for p in own)
        bytes_ += sum(p.numel() * p.element_size() for p in own)
    copies = len(adapters) * base * 4
    return {"base_parameters": base, "copies": len(adapters), "full_copies_bytes": copies,
            "adapter_parameters": params, "adapter_bytes": bytes_, "saved_bytes": copies - bytes_}


class TeacherSet:
    """The teachers (one adapter per distinct checkpoint) and the anchor, loaded onto the student's peft model.

    Args:
        model: the student's peft model (before accelerate wraps it).
        teachers: task -> adapter checkpoint (directory or ``mini:NAME``).
        anchor: ``"base"`` or an adapter checkpoint (reused when it is one of the teachers').
        base_model: the student's base checkpoint; every adapter's ``base_model_name_or_path`` must name it.
    """

    def __init__(self, model: torch.nn.Module, teachers: Mapping[str, str], anchor: str, base_model: str) -> None:
        peft_model = unwrap(model)
        self.adapter_of: dict[str, str] = {}  # task -> adapter name
        loaded: dict[str, str] = {}  # checkpoint -> adapter name
        for task, checkpoint in sorted(teachers.items()):
            if checkpoint not in loaded:
                loaded[checkpoint] = _load_frozen_adapter(peft_model, checkpoint, f"teacher_{task}", base_model,
                                                          f"teachers.{task}")
            self.adapter_of[task] = loaded[checkpoint]
        if anchor == BASE_ANCHOR:
            self.anchor: str | None = None
        elif anchor in loaded:
            self.anchor = loaded[anchor]
        else:
            self.anchor = _load_frozen_adapter(peft_model, anchor, "anchor", base_model, "anchor")
        self.frozen = sorted(set(loaded.values()) | ({self.anchor} if self.anchor else set()))

    def route_to_teacher(self, metadata: Mapping[str, Any]) -> str:
        return route_to_teacher(metadata, self.adapter_of)

    def routes(self, metas: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``{adapter name: indices of the samples it labels}`` for a batch."""
        names = [self.route_to_teacher(m) for m in metas]
        return {name: torch.as_tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
                for name in sorted(set(names))}

    @torch.no_grad()
    def kernel_means(
        self,
        config: GRPOConfig,
        policy: Any,
        model: torch.nn.Module,
        name: str | None,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        next_x: torch.Tensor,
        cond: Conditioning,
    ) -> torch.Tensor:
        """The step's kernel mean under adapter ``name`` (``None``: the base) at the given states, with CFG.

        The forward skips the DDP wrapper: the number of teacher forwards differs between processes (it
        follows the routing), and DDP may synchronise buffers in a forward.
        """
        with adapter_active(model, name), _plain_module(policy, model):
            return step_log_prob(policy, x, t, t_next, next_x, cond, config.guidance_scale, config.noise_level,
                                 config.sde_type, config.log_prob_reduction).mean

    @torch.no_grad()
    def teacher_means(
        self,
        config: GRPOConfig,
        policy: Any,
        model: torch.nn.Module,
        routes: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        next_x: torch.Tensor,
        cond: Conditioning,
    ) -> torch.Tensor:
        """Each sample's routed teacher kernel mean (one forward per teacher on its samples)."""
        out: torch.Tensor | None = None
        for name, idx in routes.items():
            i = idx.to(x.device)
            mean = self.kernel_means(config, policy, model, name, x[i], t, t_next, next_x[i], index_cond(cond, i))
            if out is None:
                out = torch.empty((x.shape[0], *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
            out[i] = mean
        if out is None:
            raise ValueError("teacher_means: empty batch")
        return out


def _load_frozen_adapter(peft_model: Any, checkpoint: str, name: str, base_model: str, key: str) -> str:
    path = model_dir(checkpoint)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{key} = {checkpoint!r}: no peft adapter at {path} (expected adapter_config.json)")
    base = adapter_base(checkpoint, base=None)
    if not _same_checkpoint(base, base_model):
        raise ConfigError(f"{key} = {checkpoint!r} is an adapter of {base!r} but the student's model is "
                          f"{base_model!r}: teachers, anchor and student must share one base network")
    peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return name


def _same_checkpoint(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = checkpoint_dir(a), checkpoint_dir(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
