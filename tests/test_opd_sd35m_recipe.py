"""The SD3.5-M OPD recipe itself, two iterations on CPU (issue 18 acceptance).

``python -m flowopd.train opd training/configs/opd_merge.toml`` with only what cannot exist here overridden: the
model (a tiny random SD3 pipeline), the cold start and the four teachers (random rank-32 adapters on it, merged with
the public ``average``), the rewards (an injected test scorer instead of the GenEval/OCR/DeQA/PickScore models and
the DeQA server), the prompts (the mini grammar: the recipe's GenEval and OCR training files are not in the offline
data), and the sizes a CPU can run (resolution, steps, group, batch, precision). The loss, estimator, KL scale, MAR,
T5 length, LoRA fields, learning rate and clip range stay the recipe's; the run changes only the student adapter and
resumes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import tiny_pipeline_with_teachers
from safetensors.torch import load_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.config import load_config
from flowopd.train.opd import OPDConfig, zero_gradient_warning

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "configs" / "opd_merge.toml"
TASKS = ("geneval", "ocr", "deqa", "pickscore")
PROMPTS = ("prompts=[" + ", ".join(
    f"{{task = '{t}', sampler = 'flowopd.world.grammar:sample_prompt', sampler_args = {{split = 'train', task = "
    f"'{'ocr' if t == 'ocr' else 'geneval'}'}}}}" for t in TASKS) + "]")
SIZES = ["resolution=16", "num_steps=3", "group_size=2", "prompts_per_iteration=4", "sample_batch_size=2",
         "updates_per_iteration=2", "mixed_precision=no", "cpu=true", "threads=1", "num_iterations=2", "save_every=1",
         "eval_every=0", "grad_cosine_every=0", "progress=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opd_sd35m")
    big = tiny_pipeline_with_teachers(root, seed=30, tasks=())
    from _fixtures import random_adapter
    from diffusers import SD3Transformer2DModel

    teachers = {}
    for i, t in enumerate(TASKS):
        transformer = SD3Transformer2DModel.from_pretrained(big["pipe"] / "transformer")
        # the recipe's LoRA fields: rank 32, alpha 64, on the attention projections
        teachers[t] = random_adapter(transformer, root / f"teacher_{t}", str(big["pipe"]), seed=40 + i, rank=32)
    merged = root / "merge"
    assert train_main(["merge", "--adapters", *(str(teachers[t]) for t in TASKS), "--method", "average",
                       "--out", str(merged)]) == 0
    overrides = [f"model={big['pipe']}", f"lora_path={merged}", "imports=['_grpo_scorers']",
                 *(f"teachers.{t}={teachers[t]}" for t in TASKS),
                 "reward.tasks={" + ", ".join(f"{t} = {{test-redness = 1.0}}" for t in TASKS) + "}",
                 "reward.servers={}", "reward.scorer_options={}", PROMPTS, *SIZES]
    out = {"root": root, "pipe": big["pipe"], "merge": merged, "overrides": overrides}
    assert train_main(["opd", str(RECIPE), f"output_dir={root / 'a'}", *overrides]) == 0
    return out


def test_the_recipe_keeps_its_loss_estimator_t5_length_and_lora(run):
    recipe = load_config(OPDConfig, RECIPE)
    recorded = json.loads((run["root"] / "a" / "config.json").read_text())
    for field in ("mode", "kl_scale", "kl_estimator", "kl_advantage", "mar_weight", "mar_scale", "anchor",
                  "max_sequence_length", "lora_rank", "lora_alpha", "lora_target_modules", "learning_rate",
                  "clip_range", "adv_clip_max", "noise_level", "guidance_scale", "timestep_fraction", "ema"):
        assert recorded[field] == json.loads(json.dumps(getattr(recipe, field))), field
    assert (recorded["mode"], recorded["kl_scale"], recorded["max_sequence_length"]) == ("pathwise", "public", 128)
    assert zero_gradient_warning(recipe) is None


def test_two_iterations_change_only_the_student_adapter(run):
    ckpts = run["root"] / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iteration-000001", "iteration-000002"]
    start = load_file(run["merge"] / "adapter_model.safetensors")
    first = load_file(ckpts / "iteration-000001" / "state" / "adapter_live.safetensors")
    second = load_file(ckpts / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert all(".default." in k for k in second)  # the student only: teachers and anchor are not saved
    moved = [k for k in second if not torch.equal(first[k], second[k])]
    assert len(moved) > len(second) // 2  # the pathwise KL moves the student
    adapter = ckpts / "iteration-000002" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (32, 64, str(run["pipe"]))
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == start.keys()
    rows = [json.loads(line) for line in (run["root"] / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["train/kl_t"] > 0 and r["train/mar_kl"] >= 0 and r["train/grad_norm"] > 0 for r in rows)


def test_resume_is_exact(run):
    resumed = run["root"] / "b"
    assert train_main(["opd", str(RECIPE), f"output_dir={resumed}", *run["overrides"],
                       f"resume={run['root'] / 'a' / 'checkpoints' / 'iteration-000001'}"]) == 0
    a = run["root"] / "a" / "checkpoints" / "iteration-000002" / "state"
    b = resumed / "checkpoints" / "iteration-000002" / "state"
    for name in ("adapter_live.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
