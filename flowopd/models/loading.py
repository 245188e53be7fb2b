"""Resolve a CHECKPOINT argument to a Policy.

Accepted forms: ``mini:NAME`` (a committed mini-world checkpoint), a mini checkpoint directory, a diffusers
SD3 directory or hub id, or a LoRA adapter directory (peft format) with a base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowopd.models.policy import Policy
from flowopd.models.sd3 import SD35M_ID, SD3Policy, offline_hint

DEFAULT_CHECKPOINT = "mini:base"


def checkpoint_kind(checkpoint: str) -> str:
    """One of ``mini``, ``sd3``, ``lora``."""
    if checkpoint.startswith("mini:"):
        return "mini"
    path = Path(checkpoint)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "lora"
        config = path / "config.json"
        if config.is_file() and str(json.loads(config.read_text()).get("format", "")).startswith("flowopd-mini"):
            return "mini"
        return "sd3"
    return "sd3"  # a hub id


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
    adapter_config = json.loads((Path(checkpoint) / "adapter_config.json").read_text())
    base = base or adapter_config.get("base_model_name_or_path") or SD35M_ID
    if checkpoint_kind(base) == "mini":
        from flowopd.models.mini import load_mini

        policy = load_mini(base, device=device)
        target = policy.net
    else:
        policy = SD3Policy.from_pretrained(base, device=device, dtype=dtype)
        target = policy.transformer
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(target, checkpoint).merge_and_unload()
    except (OSError, ValueError) as e:
        raise offline_hint(checkpoint, e) from None
    if hasattr(policy, "transformer"):
        policy.pipe.transformer = policy.transformer = merged
    else:
        policy.net = merged
    return policy
