"""Resolve a CHECKPOINT argument to a Policy.

Accepted forms: ``mini:NAME`` (a committed mini-world checkpoint or adapter under flowopd/assets/mini/),
a mini checkpoint directory, a diffusers SD3 directory or hub id, a LoRA adapter directory (peft format)
whose base is named by ``--base`` or by its ``adapter_config.json``, and the training outputs that hold one:
a checkpoint ``RUN/checkpoints/iteration-N`` (its ``adapter/``) or a run directory ``RUN`` (the adapter of
its newest checkpoint, as ``python -m flowopd.train publish`` takes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowopd.models.policy import Policy
from flowopd.models.sd3 import SD35M_ID, SD3Policy, offline_hint

DEFAULT_CHECKPOINT = "mini:base"


def checkpoint_dir(checkpoint: str) -> Path:
    if checkpoint.startswith("mini:"):
        from flowopd.models.mini import ASSETS_DIR

        return ASSETS_DIR / checkpoint.removeprefix("mini:")
    return Path(checkpoint)


def model_dir(checkpoint: str) -> Path:
    """Where the model of ``checkpoint`` lies: :func:`checkpoint_dir`, then into a training checkpoint's
    ``adapter/`` or a run directory's newest ``checkpoints/iteration-N/adapter``. A path that is none of
    these (a model directory, a hub id, a missing path) is returned as :func:`checkpoint_dir` gives it."""
    path = checkpoint_dir(checkpoint)
    if (path / "checkpoints").is_dir() and not (path / "adapter_config.json").is_file():
        found = sorted((path / "checkpoints").glob("iteration-[0-9]*[0-9]"))
        if not found:
            raise FileNotFoundError(f"{checkpoint}: a training run directory without checkpoints "
                                    f"(checkpoints/iteration-N); pass an adapter or checkpoint directory")
        path = found[-1]
    if (path / "adapter" / "adapter_config.json").is_file() and not (path / "adapter_config.json").is_file():
        path = path / "adapter"
    return path


def adapter_base(checkpoint: str, base: str | None = None) -> str:
    """The base model of a LoRA adapter checkpoint."""
    config = json.loads((model_dir(checkpoint) / "adapter_config.json").read_text())
    return base or config.get("base_model_name_or_path") or SD35M_ID


def checkpoint_kind(checkpoint: str) -> str:
    """One of ``mini``, ``sd3``, ``lora``."""
    path = model_dir(checkpoint)
    if (path / "adapter_config.json").is_file():
        return "lora"
    if checkpoint.startswith("mini:"):
        return "mini"
    config = path / "config.json"
    if config.is_file() and str(json.loads(config.read_text()).get("format", "")).startswith("flowopd-mini"):
        return "mini"
    return "sd3"  # a diffusers directory or a hub id


def is_mini(checkpoint: str, base: str | None = None) -> bool:
    """Whether a checkpoint belongs to the mini world (directly, or as an adapter on a mini base)."""
    kind = checkpoint_kind(checkpoint)
    return kind == "mini" or (kind == "lora" and checkpoint_kind(adapter_base(checkpoint, base)) == "mini")


def load_policy(
    checkpoint: str,
    base: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Policy:
    kind = checkpoint_kind(checkpoint)
    if kind == "mini":
        from flowopd.models.mini import load_mini

        return load_mini(checkpoint, device=device)
    if kind == "sd3":
        return SD3Policy.from_pretrained(checkpoint, device=device, dtype=dtype)
    base_name = adapter_base(checkpoint, base)
    policy = load_policy(base_name, device=device, dtype=dtype)
    target = policy.transformer if isinstance(policy, SD3Policy) else policy.net
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(target, str(model_dir(checkpoint))).merge_and_unload()
    except (OSError, ValueError) as e:
        raise offline_hint(checkpoint, e) from None
    if isinstance(policy, SD3Policy):
        policy.pipe.transformer = policy.transformer = merged.eval()
    else:
        policy.net = merged.eval()
    return policy
