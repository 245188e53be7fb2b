"""Flow-OPD (issue 7): KL_t through the OPD code path, the gradient paths of the modes, the router, the shared
base's memory, and the recipe end to end on a tiny random SD3 pipeline (2 iterations + exact resume) and on
the mini world (every mini OPD recipe, 1 iteration).

Runs go through the real entry point (``flowopd.train.__main__.main(["opd", CONFIG, key=value ...])``); the
reward for the per-task curves is ``test-redness`` (tests/_grpo_scorers.py). Teachers are random LoRA adapters
saved with flowopd.train.lora.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import (
    mini_world_with_adapters,
    student_with_teachers,
    tiny_pipeline_with_teachers,
    train_keeping_frozen,
)
from safetensors.torch import load_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.config import ConfigError, PromptSourceConfig, load_config
from flowopd.train.lora import unwrap
from flowopd.train.opd import (
    OPDConfig,
    check_config,
    future_kl,
    opd_step_loss,
    step_kl,
)
from flowopd.train.rollout import step_log_prob

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
grad_cosine_every = 1
grad_cosine_prompts = 1

[teachers]
geneval = "{t1}"
ocr = "{t2}"

[reward]
weights = {{ test-redness = 1.0 }}

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
def mini_world(tmp_path_factory) -> dict[str, Path]:
    """A small random mini checkpoint, two random teacher adapters on it, and its policy loader."""
    return mini_world_with_adapters(tmp_path_factory.mktemp("mini_world"))


_student = student_with_teachers


def _step(policy, seed: int = 0):
    cond = policy.encode_prompts(["two red circles", 'a sign that says "ab"', "a blue square"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    times = policy.timesteps(10)
    t, t_next = times[3], times[4]
    nxt = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    metas = [{"task": "geneval"}, {"task": "ocr"}, {"task": "geneval"}]
    return cond, x, t, t_next, nxt, metas


def test_kl_t_from_the_step_means_is_the_time_weighted_velocity_distance(mini_world):
    """KL_t of the OPD path (routed teacher's kernel mean at the student's state) = w(t)|dt| ||v_s - v_T||^2,
    with v_T from the teacher adapter merged into its own copy of the base (an independent computation)."""
    from flowopd.models.loading import load_policy

    teachers = {"geneval": str(mini_world["geneval"]), "ocr": str(mini_world["ocr"])}
    policy, model, tset = _student(mini_world, teachers)
    cfg = OPDConfig(guidance_scale=4.0, noise_level=0.7)
    cond, x, t, t_next, nxt, metas = _step(policy)
    with torch.no_grad():
        teacher_mean = tset.teacher_means(cfg, policy, model, tset.routes(metas), x, t, t_next, nxt, cond)
        new = step_log_prob(policy, x, t, t_next, nxt, cond, cfg.guidance_scale, cfg.noise_level)
        v_student = policy.velocity(x, t.expand(3), cond, cfg.guidance_scale)
        v_teacher = torch.empty_like(v_student)
        for task, rows in (("geneval", [0, 2]), ("ocr", [1])):
            teacher = load_policy(str(mini_world[task]))
            sub = {k: v[rows] for k, v in cond.items()}
            v_teacher[rows] = teacher.velocity(x[rows], t.expand(len(rows)), sub, cfg.guidance_scale)
    a, tt, dt = cfg.noise_level, float(t), float(t - t_next)
    w = (1 + a**2 / 2) ** 2 * (1 - tt) / (2 * a**2 * tt)  # METHOD.md s.3, closed form for t < 1
    expected = w * dt * ((v_student.double() - v_teacher.double()) ** 2).sum(dim=(1, 2, 3))
    kl_sum = step_kl(new, teacher_mean, "sum")
    assert torch.allclose(kl_sum.double(), expected, rtol=1e-4)
    assert (expected > 0).all()
    d = x[0].numel()
    assert torch.allclose(step_kl(new, teacher_mean, "mean").double(), expected / d, rtol=1e-4)
    assert torch.allclose(step_kl(new, teacher_mean, "public").double(), expected / d * dt, rtol=1e-4)
    # the student's flags are intact after the adapter switches: only its own adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


@pytest.mark.parametrize("mode", ["kl_only", "pathwise"])
def test_gradient_through_the_kl_advantage_only_in_pathwise(mini_world, mode):
    """With the ratio clipped where the surrogate is flat (A = -KL_t < 0, ratio < 1 - eps), the loss is
    |A| (1 - eps): its only possible gradient is through A. kl_only sends none, pathwise does."""
    teachers = {"geneval": str(mini_world["geneval"]), "ocr": str(mini_world["ocr"])}
    policy, model, tset = _student(mini_world, teachers)
    cfg = OPDConfig(mode=mode, mar_weight=0.0, guidance_scale=4.0, cfg_detach_uncond=True)
    cond, x, t, t_next, nxt, metas = _step(policy, seed=3)
    with torch.no_grad():
        old = step_log_prob(policy, x, t, t_next, nxt, cond, cfg.guidance_scale, cfg.noise_level).log_prob + 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    loss, stats, kl_t = opd_step_loss(cfg, policy, model, tset, tset.routes(metas), x, t, t_next, nxt, cond, old)
    assert (kl_t > 0).all() and float(stats["ratio_max"]) < 1 - cfg.clip_range
    assert torch.allclose(loss, (kl_t.clamp(max=cfg.adv_clip_max) * (1 - cfg.clip_range)).mean(), rtol=1e-5)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = sum(float(g.abs().sum()) for g in grads if g is not None)
    if mode == "kl_only":
        assert norm == 0.0
    else:
        assert norm > 0.0
    # the teachers' weights never require a gradient
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)


def test_mar_adds_weight_times_kl_to_the_base(mini_world):
    teachers = {"geneval": str(mini_world["geneval"]), "ocr": str(mini_world["ocr"])}
    policy, model, tset = _student(mini_world, teachers)
    cond, x, t, t_next, nxt, metas = _step(policy, seed=5)
    routes = tset.routes(metas)
    with torch.no_grad():
        old = step_log_prob(policy, x, t, t_next, nxt, cond, 4.0, 0.7).log_prob
        base = tset.kernel_means(OPDConfig(guidance_scale=4.0), policy, model, None, x, t, t_next, nxt, cond)
        new = step_log_prob(policy, x, t, t_next, nxt, cond, 4.0, 0.7)
        with unwrap(model).disable_adapter():
            plain = step_log_prob(policy, x, t, t_next, nxt, cond, 4.0, 0.7).mean
    assert torch.equal(base, plain)
    off, _, _ = opd_step_loss(OPDConfig(guidance_scale=4.0, mar_weight=0.0), policy, model, tset, routes, x, t, t_next,
                              nxt, cond, old)
    on, stats, _ = opd_step_loss(OPDConfig(guidance_scale=4.0, mar_weight=0.5), policy, model, tset, routes, x, t,
                                 t_next, nxt, cond, old)
    mar = step_kl(new, base, "public").mean()
    assert float(mar) > 0 and torch.allclose(stats["mar_kl"], mar, rtol=1e-5)
    assert torch.allclose(on - off, 0.5 * mar, rtol=1e-4)


def test_to_go_advantage_adds_the_later_steps_kl(mini_world):
    """future_kl: per recorded step, the sum of the later steps' KL of the sampled trajectory; with it the
    advantage is -(KL_t + later), clipped once."""
    from flowopd.train.rollout import sample_sde_trajectory

    teachers = {"geneval": str(mini_world["geneval"]), "ocr": str(mini_world["ocr"])}
    policy, model, tset = _student(mini_world, teachers)
    cfg = OPDConfig(guidance_scale=4.0, noise_level=0.7, sample_batch_size=2, kl_advantage="to_go", mar_weight=0.0)
    metas = [{"task": "geneval"}, {"task": "ocr"}, {"task": "ocr"}]
    cond = policy.encode_prompts(["two red circles", 'a sign that says "ab"', 'a sign that says "c"'])
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    traj = sample_sde_trajectory(policy, cond, policy.initial_noise([1, 2, 3], 32, 32), 4, 4.0, 0.7, None, gens)
    later = future_kl(cfg, policy, model, tset, traj, cond, metas)
    routes = tset.routes(metas)
    per_step = []
    for j in range(4):  # each step's KL from a fresh student step (same weights as the sampler)
        args = (traj.states[:, j], traj.times[j], traj.next_times[j], traj.next_states[:, j], cond)
        with torch.no_grad():
            teacher = tset.teacher_means(cfg, policy, model, routes, *args)
            new = step_log_prob(policy, *args[:4], cond, 4.0, 0.7)
        per_step.append(step_kl(new, teacher, cfg.kl_scale))
    kl = torch.stack(per_step, 1)
    assert torch.allclose(later, torch.stack([kl[:, j + 1 :].sum(1) for j in range(4)], 1), rtol=1e-4, atol=1e-7)
    assert (later[:, :-1] > 0).all() and (later[:, -1] == 0).all()
    j = 1
    old = traj.log_probs[:, j]  # ratio 1: the loss is -mean(A)
    loss, stats, kl_t = opd_step_loss(cfg, policy, model, tset, routes, traj.states[:, j], traj.times[j],
                                      traj.next_times[j], traj.next_states[:, j], cond, old, later_kl=later[:, j])
    adv = (-(later[:, j] + kl_t)).clamp(-5.0, 5.0)
    assert torch.allclose(loss, -adv.mean(), rtol=1e-4)
    assert torch.allclose(stats["advantage_mean"], adv.mean(), rtol=1e-4)
    with pytest.raises(ConfigError, match="gkd"):
        check_config(load_config(OPDConfig, None, ["teachers.geneval=x", "mode=gkd", "kl_advantage=to_go"]))


def test_config_checks_name_the_key():
    base = ["reward.weights.geneval=1.0", "teachers.geneval=x"]
    with pytest.raises(ConfigError, match="mode"):
        check_config(load_config(OPDConfig, None, ["mode=distill", *base]))
    with pytest.raises(ConfigError, match="beta"):
        check_config(load_config(OPDConfig, None, ["beta=0.04", *base]))
    with pytest.raises(ConfigError, match="kl_grad"):
        check_config(load_config(OPDConfig, None, ["kl_grad=pathwise", *base]))
    with pytest.raises(ConfigError, match="no reward"):
        check_config(load_config(OPDConfig, None, ["mode=mixed", "teachers.geneval=x"]))
    cfg = load_config(OPDConfig, None, ["teachers.geneval=x"])
    cfg.prompts = [PromptSourceConfig(task="ocr", sampler="flowopd.world.grammar:sample_prompt")]
    with pytest.raises(ConfigError, match=r"tasks \['ocr'\] have no teacher"):
        check_config(cfg)
    check_config(load_config(OPDConfig, None, ["teachers.geneval=x"]))  # pathwise needs no reward


# ---------------------------------------------------------------- end to end, tiny SD3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_pipeline_with_teachers(tmp_path_factory.mktemp("tiny_opd"), seed=20)


@pytest.fixture(scope="module")
def run_a(tiny, tmp_path_factory) -> Path:
    """Two iterations through the entry point, a checkpoint after each, the gradient probe on."""
    root = tmp_path_factory.mktemp("opd")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(model=tiny["pipe"], out=root / "a", t1=tiny["geneval"], t2=tiny["ocr"]))
    from flowopd.train import opd

    train_keeping_frozen(opd, "opd", recipe, root / "a")
    return root


def test_two_iterations_change_only_the_student_adapter(run_a, tiny):
    from diffusers import SD3Transformer2DModel

    ckpts = run_a / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iteration-000001", "iteration-000002"]
    first = load_file(ckpts / "iteration-000001" / "state" / "adapter_live.safetensors")
    second = load_file(ckpts / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert all(".default." in k for k in second)
    # SD3's last block discards its text queries: add_q_proj gets zero gradients (B stays 0, and A's weight
    # decay at lr 1e-4 is below float32 resolution)
    live = [k for k in second if "add_q_proj" not in k]
    assert all(second[k].abs().sum() > 0 for k in live if "lora_B" in k)  # B starts at 0 (gaussian init)
    assert all(not torch.equal(first[k], second[k]) for k in live)
    # the published adapter holds the student only, in peft's layout
    adapter = ckpts / "iteration-000002" / "adapter"
    assert sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["pipe"])

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
    for r in rows:
        assert r["train/kl_t"] > 0 and r["train/mar_kl"] >= 0 and r["train/grad_norm"] > 0
        assert any(k.startswith("kl_task/") for k in r) and any(k.startswith("reward_task/") for k in r)
        assert -1 <= r["grad_cosine/geneval__ocr"] <= 1 and r["grad_norm_task/geneval"] > 0
    lines = (run_a / "a" / "grad_cosines.csv").read_text().splitlines()
    assert lines[0] == "iteration,task_a,task_b,cosine" and [ln.split(",")[:3] for ln in lines[1:]] == [
        ["1", "geneval", "ocr"], ["2", "geneval", "ocr"]]
    memory = json.loads((run_a / "a" / "memory.json").read_text())
    assert memory["frozen_adapters"] == ["teacher_geneval", "teacher_ocr"] and memory["copies"] == 2
    assert memory["saved_bytes"] == 2 * 4 * memory["base_parameters"] - memory["adapter_bytes"]


def test_resume_from_iteration_one_is_bitwise_the_uninterrupted_run(run_a):
    resumed = run_a / "b"
    assert train_main(["opd", str(run_a / "tiny.toml"), f"output_dir={resumed}",
                       f"resume={run_a / 'a' / 'checkpoints' / 'iteration-000001'}"]) == 0
    a = run_a / "a" / "checkpoints" / "iteration-000002" / "state"
    b = resumed / "checkpoints" / "iteration-000002" / "state"
    for name in ("adapter_live.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    row_a = json.loads((run_a / "a" / "metrics.jsonl").read_text().splitlines()[1])
    row_b = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[0])
    assert row_b["iteration"] == 2 and row_a["train/kl_t"] == row_b["train/kl_t"]


# ---------------------------------------------------------------- the mini recipes


@pytest.mark.parametrize("recipe", ["mini_opd_merge.toml", "mini_opd_merge_nomar.toml", "mini_opd_sft.toml"])
def test_mini_recipes_run_one_iteration(recipe, mini_world, tmp_path, request):
    path = Path(request.config.rootpath) / "training" / "configs" / recipe
    cfg = load_config(OPDConfig, path)
    assert set(cfg.teachers) == {"geneval", "ocr", "quality", "pick"} and cfg.lora_path
    assert {s.task for s in cfg.prompts} == set(cfg.teachers) and cfg.anchor == "base"
    assert (cfg.mar_weight == 0) == recipe.endswith("nomar.toml")
    overrides = [f"model={mini_world['base']}", f"output_dir={tmp_path / 'run'}", "num_iterations=1",
                 "prompts_per_iteration=2", "group_size=2", "sample_batch_size=4", "updates_per_iteration=1",
                 "eval_every=0", "monitor_probe_every=0", "threads=1", "progress=false", "tensorboard=false",
                 f"lora_path={mini_world['sft' if 'sft' in recipe else 'merge']}",
                 *(f"teachers.{t}={mini_world[t]}" for t in cfg.teachers)]
    assert train_main(["opd", str(path), *overrides]) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert np.isfinite(row["train/loss"]) and row["train/kl_t"] > 0
    assert (tmp_path / "run" / "checkpoints" / "iteration-000001" / "adapter" / "adapter_config.json").is_file()


def test_every_published_opd_recipe_parses(request):
    root = Path(request.config.rootpath) / "training" / "configs"
    names = {p.name for p in root.glob("*opd*.toml")}
    assert names >= {"mini_opd_merge.toml", "mini_opd_merge_nomar.toml", "mini_opd_sft.toml", "opd_merge.toml",
                     "opd_sft.toml"}
    for name in sorted(names):
        cfg = load_config(OPDConfig, root / name)
        check_config(cfg)
        per_iteration = cfg.prompts_per_iteration * cfg.group_size
        assert per_iteration % (cfg.sample_batch_size * cfg.updates_per_iteration) == 0, name
    sd = load_config(OPDConfig, root / "opd_merge.toml")
    assert (sd.group_size, sd.learning_rate, sd.clip_range, sd.adv_clip_max, sd.mar_weight, sd.mode) == (
        16, 1e-4, 1e-4, 5.0, 0.04, "pathwise")
    assert (sd.kl_scale, sd.kl_estimator, sd.kl_advantage) == ("public", "analytic", "step")


@pytest.mark.slow
def test_two_cpu_processes_with_ddp_match_the_single_process_run(run_a):
    """Two processes (torchrun, DDP over gloo) route different samples, so they run different numbers of teacher
    forwards: those skip DDP, and the result matches the single-process run up to float summation order."""
    import os
    import subprocess
    import sys

    out = run_a / "ddp"
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flowopd.train", "opd",
           str(run_a / "tiny.toml"), f"output_dir={out}", "sample_batch_size=1"]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    single = load_file(run_a / "a" / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    ddp = load_file(out / "checkpoints" / "iteration-000002" / "state" / "adapter_live.safetensors")
    assert single.keys() == ddp.keys()
    assert all(torch.allclose(single[k], ddp[k], rtol=0, atol=1e-6) for k in single)
