"""Resume that tells the truth (issue 19, point 6), through the real entry point on a tiny mini-world GRPO run:
a run extended by resuming (as the mini teachers went from 36 to 84 iterations) is the uninterrupted run, with the
change applied and recorded; a corrupt newest checkpoint falls back to the previous one; ``metrics.jsonl`` has one
row per iteration after any number of resumes; pretraining resumes by the same rules; fp16's skipped steps are
counted. The refusals are in tests/test_bad_input_train.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny_runs import tiny_recipe
from safetensors.torch import load_file

from flowopd.train.__main__ import main
from flowopd.train.config import load_config
from flowopd.train.grpo import GRPOConfig
from flowopd.train.runs import (
    LENGTH_FREE_SCHEDULES,
    MAX_SKIPPED_STEPS,
    SkippedSteps,
    check_health,
    watch_scaler,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The uninterrupted run: 3 iterations, a checkpoint after each."""
    root = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(root, root / "full")
    assert main(["grpo", str(recipe), "num_iterations=3"]) == 0
    return root


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_state(a: Path, b: Path) -> bool:
    for name in ("adapter_live.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / "state" / name), load_file(b / "state" / name)
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    oa = torch.load(a / "state" / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "state" / "optimizer.pt", weights_only=True)["state"]
    return all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


def test_a_run_extended_by_resuming_is_the_uninterrupted_run(full, capsys):
    recipe, out = full / "tiny.toml", full / "extended"
    assert main(["grpo", str(recipe), f"output_dir={out}", "num_iterations=1"]) == 0
    assert main(["grpo", str(recipe), f"output_dir={out}", "num_iterations=2", "resume=latest", "save_every=2"]) == 0
    assert main(["grpo", str(recipe), f"output_dir={out}", "num_iterations=3", "resume=latest"]) == 0
    err = capsys.readouterr().err
    assert "resume: num_iterations = 2 (the checkpoint had 1)" in err and "resume: save_every = 2" in err
    assert _same_state(full / "full" / "checkpoints" / "iteration-000003", out / "checkpoints" / "iteration-000003")
    rows, reference = _rows(out), _rows(full / "full")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [r["reward/total"] for r in rows] == [r["reward/total"] for r in reference]
    log = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["changed"]) for r in log] == [
        (1, {"num_iterations": [1, 2], "save_every": [1, 2]}),
        (2, {"num_iterations": [2, 3], "save_every": [2, 1]}),
    ]
    assert json.loads((out / "config.json").read_text())["num_iterations"] == 3  # the config now in force


def test_the_mini_teacher_recipes_may_be_extended():
    for path in sorted((REPO / "training" / "configs").glob("mini_grpo_*.toml")):
        assert load_config(GRPOConfig, path).lr_scheduler in LENGTH_FREE_SCHEDULES, path.name


def test_rows_after_the_checkpoint_are_not_duplicated(full, tmp_path):
    run = tmp_path / "crashed"
    shutil.copytree(full / "full", run)
    # a crash after iteration 3 was logged but before its checkpoint was renamed into place
    (run / "checkpoints" / "iteration-000003").rename(run / "checkpoints" / "iteration-000003.tmp")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "reward/tot')  # and a line torn by the crash
    for _ in range(2):  # any number of resumes
        assert main(["grpo", str(full / "tiny.toml"), f"output_dir={run}", "num_iterations=3", "resume=latest"]) == 0
    rows = _rows(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[2]["reward/total"] == _rows(full / "full")[2]["reward/total"]
    assert _same_state(full / "full" / "checkpoints" / "iteration-000003", run / "checkpoints" / "iteration-000003")


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(full, tmp_path, capsys):
    run = tmp_path / "torn"
    shutil.copytree(full / "full", run)
    live = run / "checkpoints" / "iteration-000003" / "state" / "adapter_live.safetensors"
    live.write_bytes(live.read_bytes()[: live.stat().st_size // 2])
    assert main(["grpo", str(full / "tiny.toml"), f"output_dir={run}", "num_iterations=3", "resume=latest"]) == 0
    err = capsys.readouterr().err
    assert "iteration-000003 cannot be read (state/adapter_live.safetensors:" in err
    assert "set aside as iteration-000003.corrupt, resuming from iteration-000002" in err
    assert (run / "checkpoints" / "iteration-000003.corrupt").is_dir()
    assert _same_state(full / "full" / "checkpoints" / "iteration-000003", run / "checkpoints" / "iteration-000003")
    assert [r["iteration"] for r in _rows(run)] == [1, 2, 3]
    log = json.loads((run / "resume_log.jsonl").read_text())
    assert log["iteration"] == 2 and "adapter_live.safetensors" in log["set_aside"][str(live.parents[1])]


# ---------------------------------------------------------------- pretraining

TINY_PRETRAIN = ["model.channels=[8,16,16]", "model.text_dim=16", "model.text_layers=1", "model.heads=2",
                 "model.cond_dim=16", "model.groups=4", "batch_size=8", "warmup_steps=2", "threads=1",
                 "max_steps=4", "checkpoint_every=2", "keep_checkpoints=3"]


def test_pretraining_falls_back_and_refuses_a_changed_schedule(tmp_path, capsys):
    config = str(REPO / "training" / "configs" / "mini_pretrain.toml")
    full, run = tmp_path / "full", tmp_path / "run"
    previous = torch.get_num_threads()
    try:
        assert main(["pretrain", config, *TINY_PRETRAIN, f"out={full}"]) == 0
        shutil.copytree(full, run)
        (run / "model.safetensors").unlink()
        newest = run / "checkpoints" / "step_0000004.pt"
        newest.write_bytes(newest.read_bytes()[:1000])
        assert main(["pretrain", config, *TINY_PRETRAIN, f"out={run}", "max_steps=5"]) == 2
        assert "max_steps = 4 there, 5 now" in capsys.readouterr().err
        assert main(["pretrain", config, *TINY_PRETRAIN, f"out={run}", "checkpoint_every=1"]) == 0
    finally:
        torch.set_num_threads(previous)
    err = capsys.readouterr().err
    assert "step_0000004.pt cannot be read" in err and "resuming from step_0000002.pt" in err
    assert (run / "checkpoints" / "step_0000004.pt.corrupt").is_file()
    a, b = load_file(full / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((run / "resume_log.jsonl").read_text())
    assert log["iteration"] == 2 and log["changed"] == {"checkpoint_every": [2, 1], "out": [str(full), str(run)]}


# ---------------------------------------------------------------- the health check


def test_fp16_skipped_steps_are_counted_in_a_row_by_the_scale():
    """A real gradient scaler (CPU): a step with an inf gradient is skipped and halves the scale; a clean one
    resets the count."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    counter, step = SkippedSteps(scaler.get_scale(), 0), 0

    def iteration(grad: float, steps: int) -> int:
        nonlocal step
        for _ in range(steps):
            optimizer.zero_grad()
            scaler.scale((p * grad).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
        return counter.update(scaler.get_scale(), step, scaler.get_backoff_factor())

    assert iteration(float("inf"), 2) == 2 and torch.equal(p.detach(), torch.ones(3))  # skipped: p untouched
    assert iteration(float("inf"), 3) == 5
    assert iteration(1.0, 2) == 0 and not torch.equal(p.detach(), torch.ones(3))
    assert iteration(float("inf"), 1) == 1
    assert iteration(1.0, 1) == 0  # mixed within an iteration: a clean step restarts the count
    # the run's own counter (end_iteration's check): quiet until MAX_SKIPPED_STEPS in a row, then the stop
    watch_scaler(scaler, step)
    messages = []
    for _ in range(MAX_SKIPPED_STEPS // 4):
        iteration(float("inf"), 4)
        messages.append(check_health({}, [], None, scaler, step))
    assert messages[:-1] == [None] * (len(messages) - 1)
    assert f"skipped the last {MAX_SKIPPED_STEPS} optimizer steps" in messages[-1]

def test_the_health_check_names_what_is_not_finite():
    good = [("a", torch.ones(2)), ("b", torch.zeros(2))]
    assert check_health({"train/loss": 0.5}, good, None, None, 1) is None
    assert check_health({"train/loss": float("nan")}, good, None, None, 1) == "train/loss = nan"
    bad = [("a", torch.ones(2)), ("b", torch.tensor([0.0, float("inf")]))]
    assert check_health({}, bad, None, None, 1) == "1 of 2 adapter tensors non-finite (e.g. b)"

