"""LoRA adapters on a policy's velocity network (SD3 transformer or mini UNet), through peft (METHOD.md s.3).

The published adapters (Flow-GRPO ``scripts/train_sd3.py``): rank 32, alpha 64, gaussian init (``B = 0``, so
training starts at the base model), on the joint-attention projections ``attn.to_q, attn.to_k, attn.to_v,
attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out``. The ``attn.`` prefix
matters on SD3.5-M: its first 13 blocks also have a self-attention ``attn2`` whose projections share the
leaf names and are *not* adapted. The mini UNet names its joint attention the same way
(``attn_down.attn.to_q``...), so the same targets serve both scales.

Base weights may be bf16/fp16 while the adapter stays float32 (peft's ``autocast_adapter_dtype``). The
reference policy of the KL term is the same model with the adapter disabled (:func:`adapter_disabled`).
Adapters are saved in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``) so that
``PeftModel.from_pretrained`` and :func:`flowopd.models.loading.load_policy` read them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Flow-GRPO's LoRA targets (suffixes of module names), METHOD.md s.3.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / DeepSpeed / compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def trainable_module(policy: Any) -> nn.Module:
    """The velocity network that carries the adapter: ``policy.transformer`` (SD3) or ``policy.net`` (mini)."""
    for name in ("transformer", "net"):
        module = getattr(policy, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(policy).__name__} has no .transformer or .net module to put LoRA adapters on")


def set_trainable_module(policy: Any, module: nn.Module) -> None:
    """Put ``module`` (a PeftModel, or its DDP wrapper) where the policy's velocity calls it."""
    if isinstance(getattr(policy, "transformer", None), nn.Module):
        policy.transformer = module
        if getattr(policy, "pipe", None) is not None:
            policy.pipe.transformer = module
    elif isinstance(getattr(policy, "net", None), nn.Module):
        policy.net = module
    else:
        raise TypeError(f"{type(policy).__name__} has no .transformer or .net module to replace")


def add_lora(
    module: nn.Module,
    rank: int = 32,
    alpha: float = 64,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    adapter_path: str | Path | None = None,
    base_model: str | None = None,
) -> nn.Module:
    """Freeze ``module`` and wrap it in a peft model with one trainable float32 LoRA adapter ``"default"``.

    Args:
        rank, alpha: LoRA rank and alpha (scaling ``alpha / rank``); published 32 and 64.
        target_modules: module-name suffixes to adapt.
        init: peft's ``init_lora_weights`` (Flow-GRPO: ``"gaussian"``).
        adapter_path: start from this saved adapter (peft format) instead of a fresh one.
        base_model: recorded as ``base_model_name_or_path`` in the saved adapter config, so that a loader
            finds the base (a hub id, a diffusers directory, ``mini:NAME``).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    module.requires_grad_(False)
    if adapter_path:
        model = PeftModel.from_pretrained(module, str(adapter_path), is_trainable=True)
    else:
        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules), lora_dropout=dropout
        )
        try:
            model = get_peft_model(module, config)
        except ValueError as e:
            raise ValueError(
                f"add_lora: {e} (targets {list(target_modules)} on {type(module).__name__}); "
                f"set lora_target_modules to module-name suffixes that exist"
            ) from None
    for _, p in lora_parameters(model):
        p.data = p.data.float()  # fp32 adapter on bf16/fp16 base weights, also for a loaded adapter
    if base_model is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_model)
    return model


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the trainable adapter weights, in a fixed order (names without wrappers)."""
    params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: was add_lora called on this model?")
    return params


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (the reference policy of the KL term): peft's ``disable_adapter``."""
    peft_model = unwrap(model)
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError(f"{type(peft_model).__name__} has no adapter to disable (expected a peft model)")
    with peft_model.disable_adapter():
        yield


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write one adapter in peft's format into directory ``path`` (adapter_config.json, adapter_model.safetensors).

    Only ``adapter_name`` is written: OPD loads its teachers as further adapters of the same model, and
    peft would otherwise save each of them into a subdirectory.
    """
    path = Path(path)
    unwrap(model).save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False,
                                  selected_adapters=[adapter_name])
    return path


class EMA:
    """Exponential moving average of the adapter weights (Flow-GRPO's ``EMAModuleWrapper``).

    After optimizer step ``s`` (counted from 1), every ``update_interval`` steps,
    ``ema += (1 - d) * (param - ema)`` with the warm-up decay ``d = min((1 + s) / (10 + s), decay)``.
    Flow-GRPO uses ``decay = 0.9``, ``update_interval = 8`` ("affects the previous 20 x 8 = 160 steps").
    Deviation: Flow-GRPO calls its update once per micro-batch with the current step count (so an update
    step can be applied more than once); we update once per optimizer step.
    """

    def __init__(
        self, named_parameters: Sequence[tuple[str, torch.Tensor]], decay: float = 0.9, update_interval: int = 8
    ):
        if not 0.0 <= decay <= 1.0 or update_interval < 1:
            raise ValueError(f"EMA: need 0 <= decay <= 1 and update_interval >= 1, got {decay}, {update_interval}")
        self.decay = float(decay)
        self.update_interval = int(update_interval)
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in named_parameters}

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def update(self, named_parameters: Sequence[tuple[str, torch.Tensor]], step: int) -> bool:
        """Fold the parameters into the average after optimizer step ``step``; True if it did."""
        if step % self.update_interval:
            return False
        one_minus = 1.0 - self.decay_at(step)
        for name, p in named_parameters:
            s = self.shadow[name]
            s.add_(one_minus * (p.detach().float() - s))
        return True

    @contextlib.contextmanager
    def applied(self, named_parameters: Sequence[tuple[str, torch.Tensor]]) -> Iterator[None]:
        """Temporarily put the averaged weights into the parameters (evaluation, saving)."""
        backup = [p.detach().clone() for _, p in named_parameters]
        with torch.no_grad():
            for name, p in named_parameters:
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), b in zip(named_parameters, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise KeyError(f"EMA state does not match the adapter: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)
