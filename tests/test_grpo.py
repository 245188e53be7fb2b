"""The GRPO recipe end to end on a tiny random SD3 pipeline (issue 6 acceptance), plus its pure helpers.

The runs go through the real entry point (``flowopd.train.__main__.main(["grpo", CONFIG, key=value ...])``,
in-process to save the interpreter start-up); the reward is ``test-redness`` (tests/_grpo_scorers.py), a
real pixel computation registered through the registry API.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowopd.bench.spec import get_spec
from flowopd.train.__main__ import main as train_main
from flowopd.train.config import ConfigError, PromptSourceConfig, load_config
from flowopd.train.grpo import (
    GRPOConfig,
    compute_advantages,
    micro_batches,
    plan_iteration,
    train,
)
from flowopd.train.prompts import PromptSampler

RECIPE = """
model = "{model}"
output_dir = "{out}"
imports = ["_grpo_scorers"]
mixed_precision = "no"
cpu = true
threads = 1
lora_rank = 4
lora_alpha = 8
resolution = 16
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
sampler = "flowopd.world.grammar:sample_prompt"
sampler_args = {{ split = "train", task = "geneval" }}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from _tiny_sd3 import tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("tiny_sd3")
    pipe = tiny_sd3_pipeline(root / "tok")
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


# A benchmark of the harness that is cheap on the tiny pipeline (16 px, 2 steps), scored by test-redness.
EVAL_SPEC = """
name = "test-redness"
version = "1"
description = "GRPO test: redness of mini-world test prompts"
scale_name = "mini"
scorer = "test-redness"
scale = [-1.0, 1.0]

[prompts]
format = "python"
loader = "flowopd.world.grammar:prompt_set"
args = { task = "geneval", split = "test" }

[generation]
images_per_prompt = 2
height = 16
width = 16
steps = 2
guidance_scale = 4.5
"""


@pytest.fixture(scope="module")
def run_a(tiny_model, tmp_path_factory) -> Path:
    """Two iterations, a checkpoint after each, tensorboard on, evaluation before, after 1 and at the end."""
    root = tmp_path_factory.mktemp("grpo")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(model=tiny_model, out=root / "a"))
    (root / "specs").mkdir()
    (root / "specs" / "test-redness.toml").write_text(EVAL_SPEC)
    with_eval = root / "tiny_eval.toml"
    with_eval.write_text('eval_benchmarks = ["test-redness"]\n' + recipe.read_text())
    cfg = load_config(GRPOConfig, with_eval, ["tensorboard=true", "eval_every=1", "eval_limit=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWOPD_BENCHMARKS_DIR", str(root / "specs"))
        result = train(cfg)
    assert result.iteration == 2 and result.optimizer_step == 2
    base = {n: p.detach().clone() for n, p in _base_parameters(result.policy.transformer).items()}
    torch.save(base, root / "a" / "base_after.pt")
    return root


def _base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights and buffers of the wrapped base model under their original names (peft's base_layer removed)."""
    from flowopd.train.lora import unwrap

    base = unwrap(model).get_base_model()
    return {n.replace(".base_layer", ""): p for n, p in base.state_dict().items() if "lora_" not in n}


def test_two_iterations_train_the_adapter_and_leave_the_base_unchanged(run_a, tiny_model):
    from diffusers import SD3Transformer2DModel

    ckpts = run_a / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iteration-000001", "iteration-000002"]
    first = load_file(ckpts / "iteration-000001" / "state" / "adapter_live.safetensors")
    second = load_file(ckpts / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert all(v.dtype == torch.float32 for v in second.values())
    targets = {k.split(".lora_")[0].split(".attn.")[-1] for k in second}
    # the tiny pipeline's only block is SD3's last kind (context_pre_only): it has no to_add_out, and the
    # text queries (add_q_proj) only feed the discarded text stream, so their B gets no gradient
    assert targets == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"}
    dead = [k for k in second if "add_q_proj.lora_B" in k]
    assert len(dead) == 1 and second[dead[0]].abs().sum() == 0
    # B starts at zero (gaussian init): after two updates it is not, and the second update moved every tensor
    live = [k for k in second if k not in dead]
    assert all(second[k].abs().sum() > 0 for k in live if "lora_B" in k)
    assert all(not torch.equal(first[k], second[k]) for k in live)

    original = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").state_dict()
    after = torch.load(run_a / "a" / "base_after.pt", weights_only=True)
    assert set(after) == set(original)
    assert all(torch.equal(after[k], original[k]) for k in original)

    rows = [json.loads(line) for line in (run_a / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["eval/test-redness/mean"]) for r in rows)
    for r in rows[1:]:
        assert np.isfinite(r["reward/test-redness"]) and r["reward/total"] == r["reward/test-redness"]
        assert 0 <= r["train/clip_frac"] <= 1 and r["train/kl_loss"] >= 0 and r["train/grad_norm"] > 0
    assert list((run_a / "a" / "tensorboard").glob("events.out.tfevents.*"))


def test_saved_adapter_loads_with_peft_and_our_loader(run_a, tiny_model):
    from flowopd.models.loading import load_policy
    from flowopd.models.sd3 import SD3Policy
    from flowopd.sampling import sample_ode

    adapter = run_a / "a" / "checkpoints" / "iteration-000002" / "adapter"
    policy = load_policy(str(adapter))  # base found through adapter_config.json's base_model_name_or_path
    base = SD3Policy.from_pretrained(tiny_model)
    cond = policy.encode_prompts(["a photo of a red circle"])
    noise = policy.initial_noise([3], 16, 16)
    trained, plain = sample_ode(policy, cond, noise, 3, 4.5), sample_ode(base, cond, noise, 3, 4.5)
    assert trained.shape == (1, 3, 16, 16) and not torch.equal(trained, plain)
    ema = load_file(run_a / "a" / "checkpoints" / "iteration-000002" / "state" / "ema.safetensors")
    saved = load_file(adapter / "adapter_model.safetensors")
    # the published adapter is the EMA: peft drops the adapter name from the keys
    assert all(torch.equal(saved[k.replace(".default", "")], v) for k, v in ema.items())


def test_a_checkpoint_or_run_directory_loads_its_adapter(run_a, tiny_model):
    from flowopd.models.loading import load_policy, model_dir
    from flowopd.sampling import sample_ode

    run = run_a / "a"
    newest = run / "checkpoints" / "iteration-000002"
    assert model_dir(str(run)) == model_dir(str(newest)) == newest / "adapter"
    first = run / "checkpoints" / "iteration-000001"
    assert model_dir(str(first)) == first / "adapter"
    images = []
    for checkpoint in (newest / "adapter", newest, run):
        policy = load_policy(str(checkpoint))
        cond = policy.encode_prompts(["a photo of a red circle"])
        images.append(sample_ode(policy, cond, policy.initial_noise([3], 16, 16), 3, 4.5))
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def test_lora_path_may_name_a_run_directory(run_a, tiny_model):
    from flowopd.models.sd3 import SD3Policy
    from flowopd.train.runtime import prepare_policy

    saved = load_file(run_a / "a" / "checkpoints" / "iteration-000002" / "adapter" / "adapter_model.safetensors")
    cfg = GRPOConfig(model=str(tiny_model), lora_path=str(run_a / "a"), mixed_precision="no")
    model = prepare_policy(SD3Policy.from_pretrained(tiny_model), cfg)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_evaluating_a_run_directory_records_the_checkpoint_it_resolves_to(run_a, tmp_path, monkeypatch):
    import shutil

    from flowopd.bench.evaluate import evaluate

    monkeypatch.setenv("FLOWOPD_BENCHMARKS_DIR", str(run_a / "specs"))
    run = tmp_path / "run"
    shutil.copytree(run_a / "a" / "checkpoints" / "iteration-000001", run / "checkpoints" / "iteration-000001")
    out = tmp_path / "eval"
    results = evaluate(checkpoint=str(run), benchmarks=["test-redness"], out=out, limit=2, progress=False)
    assert results["checkpoint"] == str(run / "checkpoints" / "iteration-000001" / "adapter")
    # the run trains on: the same command must not pass the first checkpoint's images off as the newest's
    shutil.copytree(run_a / "a" / "checkpoints" / "iteration-000002", run / "checkpoints" / "iteration-000002")
    with pytest.raises(ValueError, match="made with other settings \\(identity\\) by .*iteration-000001/adapter, "
                       "not by .*iteration-000002/adapter"):
        evaluate(checkpoint=str(run), benchmarks=["test-redness"], out=out, limit=2, progress=False)


def test_a_local_directory_without_a_model_is_named_without_a_download_hint(tmp_path):
    from flowopd.models.loading import load_policy, model_dir
    from flowopd.models.sd3 import ModelNotAvailableError

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without checkpoints"):
        model_dir(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="training checkpoint") as info:
        load_policy(str(tmp_path / "empty"))
    assert "huggingface-cli" not in str(info.value)


def test_resume_from_iteration_one_is_bitwise_the_uninterrupted_run(run_a, tiny_model):
    recipe = run_a / "tiny.toml"
    resumed = run_a / "b"
    code = train_main(["grpo", str(recipe), f"output_dir={resumed}",
                       f"resume={run_a / 'a' / 'checkpoints' / 'iteration-000001'}"])
    assert code == 0
    a = run_a / "a" / "checkpoints" / "iteration-000002" / "state"
    b = resumed / "checkpoints" / "iteration-000002" / "state"
    for name in ("adapter_live.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    ta, tb = (json.loads((d / "trainer.json").read_text()) for d in (a, b))
    assert ta["sampler_rng"] == tb["sampler_rng"] and ta["optimizer_step"] == tb["optimizer_step"] == 2
    row_a = json.loads((run_a / "a" / "metrics.jsonl").read_text().splitlines()[2])
    row_b = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[0])
    assert row_b["iteration"] == 2 and row_a["reward/total"] == row_b["reward/total"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="lora_rnk"):
        load_config(GRPOConfig, None, ["lora_rnk=4"])
    with pytest.raises(ConfigError, match="group_size"):  # refused when parsed, and when built in code
        load_config(GRPOConfig, None, ["group_size=1", "reward.weights.geneval=1.0"])
    with pytest.raises(ConfigError, match="group_size"):
        train(dataclasses.replace(GRPOConfig(), group_size=1))
    cfg = load_config(GRPOConfig, None, ["sde_type=cps", "timestep_fraction=1.0", "reward.weights.geneval=1.0"])
    with pytest.raises(ConfigError, match="last step"):
        train(cfg)
    with pytest.raises(ConfigError, match="exactly one of"):
        PromptSampler([PromptSourceConfig(task="x")])


def test_every_published_recipe_parses(request):
    root = Path(request.config.rootpath) / "training" / "configs"
    recipes = sorted(root.glob("*grpo*.toml"))
    assert {p.name for p in recipes} >= {
        "grpo_geneval.toml", "grpo_ocr.toml", "grpo_deqa.toml", "grpo_pickscore.toml", "grpo_mix.toml",
        "mini_grpo_geneval.toml", "mini_grpo_ocr.toml", "mini_grpo_quality.toml", "mini_grpo_pick.toml",
        "mini_grpo_mix.toml",
    }
    data = Path(os.environ["FLOWOPD_DATA_DIR"])
    for path in recipes:
        cfg = load_config(GRPOConfig, path)
        assert cfg.prompts and (cfg.reward.weights or cfg.reward.tasks), path.name
        per_iteration = cfg.prompts_per_iteration * cfg.group_size
        assert per_iteration % (cfg.sample_batch_size * cfg.updates_per_iteration) == 0, path.name
        assert all(get_spec(name) for name in cfg.eval_benchmarks), path.name
        routed = set(cfg.reward.tasks) | ({"*"} if cfg.reward.weights else set())
        assert all(s.task in routed or "*" in routed for s in cfg.prompts), path.name
        files = [s.prompt_set["path"] for s in cfg.prompts if s.prompt_set]
        if all((data / f).is_file() for f in files):  # the others are not in ../shared/data (no network here)
            drawn = PromptSampler(cfg.prompts, cfg.mix).draw(np.random.default_rng(0), 1, 4)
            assert all(m["prompt"] and m["task"] == cfg.prompts[0].task for m in drawn), path.name
    mix = load_config(GRPOConfig, root / "grpo_mix.toml")
    assert [s.weight for s in mix.prompts] == [3, 1, 1]
    assert all(set(w.values()) == {0.8, 0.2} for w in mix.reward.tasks.values())


def test_prompt_plan_is_deterministic_and_groups_by_prompt():
    cfg = GRPOConfig(prompts_per_iteration=6, group_size=4, prompts=[
        PromptSourceConfig(task="geneval", weight=3, sampler="flowopd.world.grammar:sample_prompt",
                           sampler_args={"split": "train", "task": "geneval"}),
        PromptSourceConfig(task="ocr", weight=1, sampler="flowopd.world.grammar:sample_prompt",
                           sampler_args={"split": "train", "task": "ocr"}),
    ])
    sampler = PromptSampler(cfg.prompts, "iteration")
    plans = [plan_iteration(cfg, sampler, np.random.default_rng(7), it) for it in (1, 1, 4)]
    assert [m["prompt"] for m in plans[0].metas] == [m["prompt"] for m in plans[1].metas]
    assert np.array_equal(plans[0].noise_seeds, plans[1].noise_seeds)
    assert {m["task"] for m in plans[0].metas} == {"geneval"} and {m["task"] for m in plans[2].metas} == {"ocr"}
    plan = plans[0]
    assert len(plan.metas) == 24 and len(set(plan.noise_seeds.tolist())) == 24
    for g in np.unique(plan.group_ids):  # a group is one distinct prompt, of at least group_size samples
        members = np.flatnonzero(plan.group_ids == g)
        assert len({plan.metas[i]["prompt"] for i in members}) == 1 and len(members) % 4 == 0
    mixed = PromptSampler(cfg.prompts, "prompt").draw(np.random.default_rng(0), 1, 400)
    share = np.mean([m["task"] == "geneval" for m in mixed])
    assert 0.65 < share < 0.85  # weights 3:1


def test_same_group_noise_shares_the_start_within_a_draw_and_keeps_the_plan():
    sources = [PromptSourceConfig(task="geneval", sampler="flowopd.world.grammar:sample_prompt",
                                  sampler_args={"split": "train", "task": "geneval"})]
    own = GRPOConfig(prompts_per_iteration=5, group_size=4, prompts=sources)
    same = dataclasses.replace(own, same_group_noise=True)
    sampler = PromptSampler(sources, "iteration")
    a, b = (plan_iteration(c, sampler, np.random.default_rng(3), 2) for c in (own, same))
    assert [m["prompt"] for m in a.metas] == [m["prompt"] for m in b.metas] and a.sde_steps == b.sde_steps
    assert np.array_equal(a.sde_seeds, b.sde_seeds)  # only the starting noise changes
    assert len(set(b.noise_seeds.tolist())) == 5 and len(set(a.noise_seeds.tolist())) == 20
    assert set(b.noise_seeds.tolist()) <= set(a.noise_seeds.tolist())
    for seed in set(b.noise_seeds.tolist()):  # a seed is one draw's: 4 samples of one prompt
        members = np.flatnonzero(b.noise_seeds == seed)
        assert len(members) == 4 and len({b.metas[i]["prompt"] for i in members}) == 1


def test_advantages_drop_constant_and_nan_groups_and_micro_batches_pad():
    total = np.array([1.0, 2.0, 5.0, 5.0, np.nan, 3.0, 0.5, 0.5])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    adv, keep = compute_advantages(total, groups, clip=5.0, std="batch")
    assert keep.tolist() == [True, True, False, False, False, False, False, False]
    finite_std = np.std(total[np.isfinite(total)])
    assert np.allclose(adv[:2], [-0.5 / (finite_std + 1e-4), 0.5 / (finite_std + 1e-4)], rtol=1e-6)
    assert np.all(adv[2:] == 0)
    batches = micro_batches(keep, 2, np.random.default_rng(0))
    assert len(batches) == 2 and all(len(b) == 1 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == [0, 1]
    padded = micro_batches(np.array([True, False, True, False, True, False]), 2, np.random.default_rng(0))
    assert [len(b) for b in padded] == [2, 2] and {0, 2, 4} <= set(np.concatenate(padded).tolist())
    nothing = micro_batches(np.zeros(4, dtype=bool), 2, np.random.default_rng(0))
    assert [len(b) for b in nothing] == [1, 1]


@pytest.mark.slow
def test_two_cpu_processes_with_ddp_match_the_single_process_run(run_a):
    """Two processes (torchrun, DDP over gloo; ``accelerate launch --cpu`` starts only one): same prompts,
    seeds and mean gradient as the single-process run, up to float summation order."""
    import os
    import subprocess
    import sys

    out = run_a / "ddp"
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flowopd.train", "grpo",
           str(run_a / "tiny.toml"), f"output_dir={out}", "sample_batch_size=1"]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    single = load_file(run_a / "a" / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    ddp = load_file(out / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert single.keys() == ddp.keys()
    assert all(torch.allclose(single[k], ddp[k], rtol=0, atol=1e-6) for k in single)
    assert sorted(p.name for p in (out / "checkpoints" / "iteration-000002" / "state").glob("rng_*")) == [
        "rng_0.json", "rng_0.safetensors", "rng_1.json", "rng_1.safetensors"]
