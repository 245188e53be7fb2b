"""The SFT cold start (issue 7 point 1): its loss, 2 steps + exact resume through the entry point on a tiny random
SD3 pipeline with two random teacher adapters, best-of-N data, and the mini recipe for 1 iteration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import MINI_SMALL, random_adapter, tiny_pipeline_with_teachers, train_keeping_frozen
from safetensors.torch import load_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.config import ConfigError, load_config
from flowopd.train.lora import add_lora
from flowopd.train.sft import SFTConfig, check_config, sample_times, sft_loss

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
sample_steps = 3
guidance_scale = 4.5
prompts_per_iteration = 4
sample_batch_size = 4
train_batch_size = 2
num_iterations = 2
save_every = 1
eval_every = 0
progress = false
tensorboard = false
learning_rate = 1e-3

[teachers]
geneval = "{t1}"
ocr = "{t2}"

[[prompts]]
task = "geneval"
sampler = "flowopd.world.grammar:sample_prompt"
sampler_args = {{ split = "train", task = "geneval" }}

[[prompts]]
task = "ocr"
sampler = "flowopd.world.grammar:sample_prompt"
sampler_args = {{ split = "train", task = "ocr" }}
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_pipeline_with_teachers(tmp_path_factory.mktemp("tiny_sft"), seed=30)


@pytest.fixture(scope="module")
def run_a(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(model=tiny["pipe"], out=root / "a", t1=tiny["geneval"], t2=tiny["ocr"]))
    from flowopd.train import sft

    train_keeping_frozen(sft, "sft", recipe, root / "a")
    return root


def test_two_steps_train_only_the_adapter(run_a, tiny):
    from diffusers import SD3Transformer2DModel

    ckpts = run_a / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iteration-000001", "iteration-000002"]
    first = load_file(ckpts / "iteration-000001" / "state" / "adapter_live.safetensors")
    second = load_file(ckpts / "iteration-000002" / "state" / "adapter_live.safetensors")
    # the flow-matching loss is unguided here: the last block's discarded text queries get no gradient
    live = [k for k in second if "add_q_proj" not in k]
    assert all(".default." in k for k in second)
    assert all(second[k].abs().sum() > 0 for k in live if "lora_B" in k)  # B starts at 0
    assert all(not torch.equal(first[k], second[k]) for k in live)

    frozen = torch.load(run_a / "a" / "frozen_after.pt", weights_only=True)
    original = SD3Transformer2DModel.from_pretrained(tiny["pipe"] / "transformer").state_dict()
    base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in frozen.items()
            if ".lora_" not in k}
    assert set(base) == set(original) and all(torch.equal(base[k], original[k]) for k in original)
    for task in ("geneval", "ocr"):
        saved = load_file(tiny[task] / "adapter_model.safetensors")
        mine = {k.replace(f".teacher_{task}.", "."): v for k, v in frozen.items() if f".teacher_{task}." in k}
        assert set(mine) == set(saved) and all(torch.equal(mine[k], saved[k]) for k in saved)

    rows = [json.loads(line) for line in (run_a / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    # the student starts at the base (B = 0): no pull in the first update, a positive one after it
    assert rows[0]["train/anchor_l2"] == 0.0 and rows[1]["train/anchor_l2"] > 0
    assert all(r["train/fm_loss"] > 0 and r["train/grad_norm"] > 0 for r in rows)


def test_checkpoint_adapter_loads_with_our_loader(run_a, tiny):
    from flowopd.models.loading import load_policy
    from flowopd.models.sd3 import SD3Policy
    from flowopd.sampling import sample_ode

    policy = load_policy(str(run_a / "a" / "checkpoints" / "iteration-000002" / "adapter"))
    base = SD3Policy.from_pretrained(tiny["pipe"])
    cond = policy.encode_prompts(["two red circles"])
    noise = policy.initial_noise([5], 16, 16)
    assert not torch.equal(sample_ode(policy, cond, noise, 3, 4.5), sample_ode(base, cond, noise, 3, 4.5))


def test_resume_from_iteration_one_is_bitwise_the_uninterrupted_run(run_a):
    resumed = run_a / "b"
    assert train_main(["sft", str(run_a / "tiny.toml"), f"output_dir={resumed}",
                       f"resume={run_a / 'a' / 'checkpoints' / 'iteration-000001'}"]) == 0
    a = run_a / "a" / "checkpoints" / "iteration-000002" / "state"
    b = resumed / "checkpoints" / "iteration-000002" / "state"
    wa, wb = load_file(a / "adapter_live.safetensors"), load_file(b / "adapter_live.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    row_a = json.loads((run_a / "a" / "metrics.jsonl").read_text().splitlines()[1])
    row_b = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[0])
    assert row_a["train/loss"] == row_b["train/loss"]


def test_best_of_n_keeps_the_best_sample(tiny, tmp_path):
    recipe = tmp_path / "bon.toml"
    text = RECIPE.format(model=tiny["pipe"], out=tmp_path / "bon", t1=tiny["geneval"], t2=tiny["ocr"])
    teachers = f'[teachers]\ngeneval = "{tiny["geneval"]}"\nocr = "{tiny["ocr"]}"\n'
    assert teachers in text
    recipe.write_text(text.replace(teachers, 'data = "best_of_n"\nbest_of_n = 3\n\n[reward]\n'
                                             'weights = { test-redness = 1.0 }\n'))
    assert train_main(["sft", str(recipe), "num_iterations=1"]) == 0
    row = json.loads((tmp_path / "bon" / "metrics.jsonl").read_text())
    assert np.isfinite(row["data/reward_best"]) and row["data/reward_best"] > row["data/reward_mean"]


def test_the_loss_is_flow_matching_plus_the_pull_and_fits_a_batch():
    from flowopd.models.mini import MiniTokenizer, build_mini

    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **MINI_SMALL)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)  # zero-initialised: v would not depend on x
    model = add_lora(policy.net, 4, 8)
    policy.net = model
    cond = policy.encode_prompts(["two red circles", "a blue square"])
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([0.3, 0.8])
    loss, stats = sft_loss(policy, model, x0, eps, t, cond, anchor_weight=0.5)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = policy.velocity(x_t, t, cond, 1.0)
    assert torch.allclose(stats["fm_loss"], ((v - (eps - x0)) ** 2).mean(), rtol=1e-5)
    assert stats["anchor_l2"] == 0 and torch.allclose(loss, stats["fm_loss"])  # B = 0: the student is the base
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(40):
        loss, stats = sft_loss(policy, model, x0, eps, t, cond, anchor_weight=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, stats = sft_loss(policy, model, x0, eps, t, cond, anchor_weight=0.5)
    before = float(((v - (eps - x0)) ** 2).mean())
    assert float(after.detach()) < 0.95 * before and float(stats["fm_loss"]) < float(after.detach())
    assert float(stats["anchor_l2"]) > 0


def test_times_and_config_checks():
    rng = np.random.default_rng(0)
    for kind in ("logit_normal", "uniform"):
        t = sample_times(rng, (1000,), kind)
        assert t.min() > 0 and t.max() < 1 and abs(np.median(t) - 0.5) < 0.05
    with pytest.raises(ConfigError, match="time_sampling"):
        sample_times(rng, (2,), "cosine")
    with pytest.raises(ConfigError, match="no teacher"):
        check_config(load_config(SFTConfig, None, ["prompts=[{task = 'ocr', sampler = 'x:y'}]"]), 1)
    with pytest.raises(ConfigError, match="best_of_n"):
        check_config(load_config(SFTConfig, None, ["data=best_of_n"]), 1)
    with pytest.raises(ConfigError, match="train_batch_size"):
        check_config(load_config(SFTConfig, None, ["teachers.ocr=x", "prompts_per_iteration=6"]), 1)


def test_mini_recipe_runs_one_iteration(tmp_path, request):
    from flowopd.models.mini import MiniTokenizer, build_mini, load_mini, save_mini

    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **MINI_SMALL)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)
    save_mini(policy, tmp_path / "base")
    path = Path(request.config.rootpath) / "training" / "configs" / "mini_sft.toml"
    cfg = load_config(SFTConfig, path)
    assert set(cfg.teachers) == {"geneval", "ocr", "quality", "pick"} and cfg.data == "teachers"
    teachers = [
        f"teachers.{t}={random_adapter(load_mini(tmp_path / 'base').net, tmp_path / t, str(tmp_path / 'base'), i)}"
        for i, t in enumerate(cfg.teachers)
    ]
    overrides = [f"model={tmp_path / 'base'}", f"output_dir={tmp_path / 'run'}", "num_iterations=1",
                 "prompts_per_iteration=4", "sample_batch_size=4", "train_batch_size=2", "eval_every=0",
                 "threads=1", "progress=false", "tensorboard=false", *teachers]
    assert train_main(["sft", str(path), *overrides]) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert np.isfinite(row["train/loss"]) and row["optimizer_step"] == cfg.epochs_per_iteration
    assert (tmp_path / "run" / "checkpoints" / "iteration-000001" / "adapter" / "adapter_config.json").is_file()


def test_every_published_sft_recipe_parses(request):
    root = Path(request.config.rootpath) / "training" / "configs"
    for name in ("mini_sft.toml", "sft.toml"):
        cfg = load_config(SFTConfig, root / name)
        assert check_config(cfg, 1)[0] >= 1, name
    opd_sft = (root / "mini_opd_sft.toml").read_text()
    cfg = load_config(SFTConfig, root / "mini_sft.toml")
    assert 'lora_path = "mini:sft"' in opd_sft  # the SFT-init OPD recipe starts from the published SFT adapter
    from flowopd.bench.report import load_table

    recipe = next(r for r in load_table("table1")["rows"] if r["run"]["mini"] == "mini:opd-sft")["recipe"]["mini"]
    publish = recipe.index(f"publish {cfg.output_dir} mini:sft")  # ... which the SFT recipe's run publishes
    assert recipe[publish - 1] == "sft training/configs/mini_sft.toml"


@pytest.mark.slow
def test_two_cpu_processes_with_ddp_match_the_single_process_run(run_a):
    """Two processes (torchrun, DDP over gloo): each makes and trains its share of the samples; same update as
    the single-process run up to float summation order."""
    import os
    import subprocess
    import sys

    out = run_a / "ddp"
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flowopd.train", "sft",
           str(run_a / "tiny.toml"), f"output_dir={out}", "sample_batch_size=2"]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    single = load_file(run_a / "a" / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    ddp = load_file(out / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert single.keys() == ddp.keys()
    assert all(torch.allclose(single[k], ddp[k], rtol=0, atol=1e-6) for k in single)


def test_public_time_draw_is_the_shifted_scheduler_grid():
    """time_grid = 1000, time_shift = 3: t = S(1 - floor(1000 u) / 1000), S(s) = 3s / (1 + 2s), the public SFT's
    index into the SD3.5 scheduler's 1000 shifted training sigmas."""
    u = sample_times(np.random.default_rng(7), (4000,), "logit_normal")
    t = sample_times(np.random.default_rng(7), (4000,), "logit_normal", shift=3.0, grid=1000)
    s = 1 - np.floor(1000 * u) / 1000
    np.testing.assert_allclose(t, 3 * s / (1 + 2 * s), rtol=1e-12)
    grid = 3 * (1 - np.arange(1000) / 1000) / (1 + 2 * (1 - np.arange(1000) / 1000))
    assert np.isin(np.round(t, 12), np.round(grid, 12)).all() and t.max() <= 1.0 and t.min() > 0
    assert np.median(t) > 0.7  # shift 3 moves the mass toward noise
    assert np.array_equal(sample_times(np.random.default_rng(7), (4000,), "logit_normal", shift=1.0, grid=0), u)


@pytest.mark.parametrize("override, field", [("time_shift=0", "time_shift"), ("time_shift=inf", "time_shift"),
                                             ("time_grid=-1", "time_grid"),
                                             ("data_noise_level=-0.5", "data_noise_level"),
                                             ("max_sequence_length=0", "max_sequence_length")])
def test_bad_public_sft_settings_are_refused(override, field):
    with pytest.raises(ConfigError, match=field):
        config = load_config(SFTConfig, None, ["teachers.ocr=x", override])
        check_config(config, 1)


def test_public_preset_parses_with_the_public_values(request):
    root = Path(request.config.rootpath) / "training" / "configs"
    cfg = load_config(SFTConfig, root / "sft_public.toml")
    assert check_config(cfg, 1)[0] >= 1
    assert (cfg.data, cfg.best_of_n, cfg.data_noise_level, cfg.anchor_weight, cfg.time_shift, cfg.time_grid,
            cfg.learning_rate, cfg.sample_steps, cfg.max_sequence_length) == (
        "best_of_n", 24, 0.7, 100.0, 3.0, 1000, 3e-4, 40, 128)


def test_best_of_n_with_sde_data_sampling(tiny, tmp_path):
    """data_noise_level > 0: the best-of-n data come from the SDE sampler, reproducibly (seeded per sample)."""
    text = RECIPE.format(model=tiny["pipe"], out=tmp_path / "bon", t1=tiny["geneval"], t2=tiny["ocr"])
    teachers = f'[teachers]\ngeneval = "{tiny["geneval"]}"\nocr = "{tiny["ocr"]}"\n'
    rows = []
    for name, noise in (("ode", 0.0), ("sde", 0.7), ("sde2", 0.7)):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(text.replace(teachers, f'data = "best_of_n"\nbest_of_n = 3\ndata_noise_level = {noise}\n\n'
                                       '[reward]\nweights = { test-redness = 1.0 }\n').replace(
                                       str(tmp_path / "bon"), str(tmp_path / name)))
        assert train_main(["sft", str(recipe), "num_iterations=1"]) == 0
        rows.append(json.loads((tmp_path / name / "metrics.jsonl").read_text()))
    assert rows[1]["data/reward_mean"] == rows[2]["data/reward_mean"]  # same seeds, same SDE samples
    assert rows[0]["data/reward_mean"] != rows[1]["data/reward_mean"]  # the SDE draws other images
