"""Helpers shared by the training tests (GRPO, OPD, SFT, merge): small models and random adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from flowopd.train.lora import add_lora, save_adapter, unwrap

# A mini-world model small enough for unit tests (the real mini base is ~1.5M parameters).
MINI_SMALL = {"channels": [8, 16, 16], "text_dim": 16, "text_layers": 1, "heads": 2, "cond_dim": 16, "groups": 4}


def random_adapter(module: torch.nn.Module, out: Path, base: str, seed: int, rank: int = 4) -> Path:
    """A random (non-zero B) LoRA adapter of ``module`` saved in peft format with ``base`` as its base."""
    torch.manual_seed(seed)
    save_adapter(add_lora(module, rank, 2 * rank, init=False, base_model=base), out)
    return out


def mini_world_with_adapters(root: Path) -> dict[str, Path]:
    """A small random mini checkpoint saved under ``root/base`` and six random adapters on it (geneval, ocr,
    quality, pick, merge, sft), by name."""
    from flowopd.models.mini import MiniTokenizer, build_mini, load_mini, save_mini

    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **MINI_SMALL)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)  # zero-initialised: v would not depend on x
    save_mini(policy, root / "base")
    out = {"base": root / "base"}
    for i, name in enumerate(["geneval", "ocr", "quality", "pick", "merge", "sft"]):
        out[name] = random_adapter(load_mini(root / "base").net, root / name, str(root / "base"), seed=10 + i,
                                   rank=4)
    return out


def student_with_teachers(mini_world: dict[str, Path], teachers: dict[str, str], anchor: str = "base"):
    """(policy, student peft model, TeacherSet): a random student adapter on the mini world's base and the
    ``teachers`` (task -> adapter) loaded beside it."""
    from flowopd.models.mini import load_mini
    from flowopd.train.teachers import TeacherSet

    policy = load_mini(mini_world["base"])
    torch.manual_seed(1)
    model = add_lora(policy.net, 4, 8, init=False, base_model=str(mini_world["base"]))
    policy.net = model
    return policy, model, TeacherSet(model, teachers, anchor, str(mini_world["base"]))


def tiny_pipeline_with_teachers(root: Path, seed: int, tasks: tuple[str, ...] = ("geneval", "ocr")) -> dict[str, Path]:
    """The tiny random SD3 pipeline saved under ``root/pipe`` and one random teacher adapter per task."""
    from _tiny_sd3 import tiny_sd3_pipeline
    from diffusers import SD3Transformer2DModel

    tiny_sd3_pipeline(root / "tok").save_pretrained(root / "pipe")
    out = {"pipe": root / "pipe"}
    for i, task in enumerate(tasks):
        transformer = SD3Transformer2DModel.from_pretrained(root / "pipe" / "transformer")
        out[task] = random_adapter(transformer, root / f"teacher_{task}", str(root / "pipe"), seed=seed + i)
    return out


def train_keeping_frozen(module, command: str, recipe: Path, out_dir: Path) -> None:
    """Run ``python -m flowopd.train COMMAND RECIPE`` in-process and save the trained policy's frozen (non-
    adapter) weights to ``out_dir/frozen_after.pt``, to check later that training left them unchanged."""
    import pytest

    from flowopd.train.__main__ import main as train_main

    results = []
    real_train = module.train
    with pytest.MonkeyPatch.context() as mp:  # keep the trained policy to inspect its frozen weights
        mp.setattr(module, "train", lambda cfg: results.append(real_train(cfg)) or results[-1])
        assert train_main([command, str(recipe)]) == 0
    peft_model = unwrap(results[0].policy.transformer)
    torch.save({n: t.detach().clone() for n, t in peft_model.state_dict().items() if ".default." not in n},
               out_dir / "frozen_after.pt")
