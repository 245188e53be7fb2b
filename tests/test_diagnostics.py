"""Diagnostics (issue 7 point 5): gradient cosines between task losses, their accumulation, per-task reward
means, the CSV log with resume, the plots, and the GRPO-Mix hook (which leaves training unchanged)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowopd.train.diagnostics import (
    GradientCosineCSV,
    TaskGradients,
    main,
    plot_gradient_cosines,
    plot_task_rewards,
    probe_task_gradients,
    task_gradient_cosines,
    task_reward_metrics,
)


def test_cosines_of_linear_losses_are_the_cosines_of_their_coefficients():
    w = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(2))
    ca, cb = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.0]), torch.tensor([2.0, 4.0, 0.0, 2.0, 0.0])
    cc = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0])  # orthogonal to ca
    params = torch.cat([w, b])
    losses = {"a": ca @ params, "b": cb @ params, "c": cc @ params, "d": -(ca @ params)}
    cos = task_gradient_cosines(losses, [w, b])
    assert set(cos) == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}
    assert cos[("a", "b")] == pytest.approx(1.0) and cos[("a", "d")] == pytest.approx(-1.0)
    assert cos[("a", "c")] == pytest.approx(0.0, abs=1e-12)
    mixed = {"a": ca @ params, "e": torch.tensor([1.0, 0, 0, 0, 0]) @ params}
    expected = float(ca[0] / ca.norm())
    assert task_gradient_cosines(mixed, [w, b])[("a", "e")] == pytest.approx(expected)
    assert w.grad is None  # autograd.grad: the parameters' .grad is untouched
    flat = TaskGradients([w, b])
    flat.add("zero", (w * 0).sum())
    flat.add("a", ca @ torch.cat([w, b]))
    assert math.isnan(flat.cosines()[("a", "zero")]) and flat.norms()["a"] == pytest.approx(float(ca.norm()))


def test_shared_graph_and_accumulation_match_the_gradient_of_the_mean_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    params = list(net.parameters())
    x = torch.randn(10, 4)
    y = torch.randn(10)
    tasks = ["p", "q", "p", "p", "q", "q", "p", "q", "p", "p"]

    def task_loss(idx: torch.Tensor, j: int) -> torch.Tensor:
        return ((net(x[idx]).squeeze(1) * (j + 1) - y[idx]) ** 2).mean()

    grads = probe_task_gradients(task_loss, tasks, [0, 1], params, chunk=2)
    for task in ("p", "q"):
        idx = torch.as_tensor([i for i, t in enumerate(tasks) if t == task])
        mean = (task_loss(idx, 0) + task_loss(idx, 1)) / 2
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean, params)])
        assert torch.allclose(grads.grads[task], expected, rtol=1e-5, atol=1e-7)
    # one forward over the mixed batch: the losses share the graph
    out = net(x).squeeze(1)
    loss_by_task = {t: ((out - y)[[i for i, s in enumerate(tasks) if s == t]] ** 2).mean() for t in ("p", "q")}
    cos = task_gradient_cosines(loss_by_task, params)
    assert -1 <= cos[("p", "q")] <= 1
    metrics = grads.metrics()
    assert metrics["grad_cosine/p__q"] == metrics["grad_cosine/mean"] and metrics["grad_norm_task/q"] > 0


def test_task_reward_metrics_ignore_nan():
    total = np.array([1.0, np.nan, 3.0, 0.5, np.nan])
    tasks = ["geneval", "geneval", "geneval", "ocr", "pick"]
    m = task_reward_metrics(total, tasks)
    assert m["reward_task/geneval"] == 2.0 and m["reward_task/ocr"] == 0.5 and math.isnan(m["reward_task/pick"])


def test_csv_log_drops_rows_after_the_resumed_iteration_and_plots(tmp_path):
    log = GradientCosineCSV(tmp_path / "run" / "grad_cosines.csv")
    for it in (5, 10, 15):
        log.write(it, {("geneval", "ocr"): 0.1 * it / 5, ("geneval", "pick"): -0.2, ("ocr", "pick"): 0.0})
    GradientCosineCSV(tmp_path / "run" / "grad_cosines.csv", start=10)
    lines = (tmp_path / "run" / "grad_cosines.csv").read_text().splitlines()
    assert lines[0] == "iteration,task_a,task_b,cosine" and {ln.split(",")[0] for ln in lines[1:]} == {"5", "10"}
    other = GradientCosineCSV(tmp_path / "other" / "grad_cosines.csv")
    other.write(5, {("geneval", "ocr"): 0.5})
    png = plot_gradient_cosines([tmp_path / "run", tmp_path / "other" / "grad_cosines.csv"], tmp_path / "c.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, rows in (("run", [1, 2, 3]), ("other", [1, 2])):
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(
            json.dumps({"iteration": i, "reward_task/geneval": 0.1 * i, "reward_task/ocr": None}) for i in rows))
    assert main(["rewards", str(tmp_path / "run"), str(tmp_path / "other"), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert plot_task_rewards([tmp_path / "run"], tmp_path / "r2.png", labels=["grpo-mix"]).is_file()
    with pytest.raises(FileNotFoundError, match="grad_cosines.csv"):
        plot_gradient_cosines([tmp_path / "missing"], tmp_path / "x.png")


GRPO_RECIPE = """
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
num_iterations = 1
eval_every = 0
progress = false
tensorboard = false
mix = "prompt"

[reward.tasks]
geneval = {{ test-redness = 1.0 }}
ocr = {{ "test-redness.bright" = 1.0 }}

[[prompts]]
task = "geneval"
sampler = "flowopd.world.grammar:sample_prompt"
sampler_args = {{ split = "train", task = "geneval" }}

[[prompts]]
task = "ocr"
sampler = "flowopd.world.grammar:sample_prompt"
sampler_args = {{ split = "train", task = "ocr" }}
"""


def test_grpo_mix_probe_logs_cosines_and_leaves_training_unchanged(tmp_path):
    from flowopd.models.mini import MiniTokenizer, build_mini, save_mini
    from flowopd.train.__main__ import main as train_main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        policy = build_mini(MiniTokenizer.from_grammar(max_length=20), channels=[8, 16, 16], text_dim=16,
                            text_layers=1, heads=2, cond_dim=16, groups=4)
        torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)
        save_mini(policy, tmp_path / "base")
        recipe = tmp_path / "mix.toml"
        recipe.write_text(GRPO_RECIPE.format(model=tmp_path / "base", out=tmp_path / "plain"))
        assert train_main(["grpo", str(recipe)]) == 0
        assert train_main(["grpo", str(recipe), f"output_dir={tmp_path / 'probed'}", "grad_cosine_every=1",
                           "grad_cosine_prompts=2"]) == 0
    finally:
        torch.set_num_threads(previous)
    state = Path("checkpoints") / "iteration-000001" / "state" / "adapter_live.safetensors"
    plain, probed = load_file(tmp_path / "plain" / state), load_file(tmp_path / "probed" / state)
    assert all(torch.equal(plain[k], probed[k]) for k in plain)
    row = json.loads((tmp_path / "probed" / "metrics.jsonl").read_text())
    assert -1 <= row["grad_cosine/geneval__ocr"] <= 1 and row["grad_norm_task/geneval"] > 0
    assert {"reward_task/geneval", "reward_task/ocr"} & set(row)
    lines = (tmp_path / "probed" / "grad_cosines.csv").read_text().splitlines()
    assert [ln.split(",")[:3] for ln in lines[1:]] == [["1", "geneval", "ocr"]]
    assert not (tmp_path / "plain" / "grad_cosines.csv").exists()
