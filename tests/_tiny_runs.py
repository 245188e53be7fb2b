"""A tiny mini-world base model and GRPO recipe for the training tests that need real runs and checkpoints
(tests/test_bad_input_train.py, tests/test_train_resume.py): one iteration takes about a second on one thread."""

from __future__ import annotations

from pathlib import Path

import torch

RECIPE = """
model = "{model}"
output_dir = "{out}"
imports = ["_grpo_scorers"]
mixed_precision = "no"
cpu = true
threads = 1
lora_rank = 4
lora_alpha = 8
resolution = 32
num_steps = 3
group_size = 2
prompts_per_iteration = 2
sample_batch_size = 2
updates_per_iteration = 1
num_iterations = 2
save_every = 1
eval_every = 0
ema_update_interval = 1
progress = false
tensorboard = false

[reward]
weights = {{ test-redness = 1.0 }}

[[prompts]]
task = "geneval"
sampler = "mini-world"
sampler_args = {{ split = "train", task = "geneval" }}
"""


def tiny_base(path: Path) -> Path:
    """Save a small random mini model (about 60k parameters) at ``path``."""
    from flowopd.models.mini import MiniTokenizer, build_mini, save_mini

    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), channels=[8, 16, 16], text_dim=16, text_layers=1,
                        heads=2, cond_dim=16, groups=4)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)  # so that the images, and rewards, differ
    save_mini(policy, path)
    return path


def tiny_recipe(root: Path, out: Path | None = None) -> Path:
    """A base model under ``root`` and a 2-iteration GRPO recipe on it (``output_dir`` ``out``, default root/run)."""
    base = root / "base"
    if not base.is_dir():
        tiny_base(base)
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(model=base, out=out or root / "run"))
    return recipe
