"""Bad input to ``python -m flowopd.train`` (issue 19, points 3-6, the training side): every case goes through the
real entry point (:func:`flowopd.train.__main__.main`, in-process; two through a subprocess) and must end as
exit status 2 with one ``error:`` line that names the file, field or checkpoint at fault - never a traceback,
never exit 0 with a wrong result.

Outcome classes (counted in the report of issue 19): every case here is a *clear error*; the recoveries (a
corrupt newest checkpoint falls back, a changeable field is applied and recorded) are in tests/test_train_resume.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_runs import tiny_recipe

from flowopd.train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *patterns: str) -> str:
    """Run the entry point; assert exit 2, no traceback, one ``error:`` line of at most 2 lines matching every
    pattern (regular expressions); return that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    assert code == 2, (code, err[-3000:])
    errors = [i for i, line in enumerate(err.splitlines()) if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    message = err.splitlines()[errors[0]]
    assert len(err.splitlines()[errors[0]:]) <= 2, err
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny base model, its recipe, and a finished 2-iteration run (``run/``, checkpoints 1 and 2)."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["grpo", str(tiny_recipe(root))]) == 0
    return root


@pytest.fixture
def run_copy(world, tmp_path) -> Path:
    """A private copy of the finished run, to break."""
    shutil.copytree(world / "run", tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- config values, refused when parsed

PARSE_CASES = [
    # (override, patterns the message must match)
    ("learning_rate=inf", [r"override learning_rate=inf", r"'learning_rate' must be a finite number, got inf"]),
    ("learning_rate=nan", [r"'learning_rate' must be a finite number, got nan"]),
    ("learning_rate=-1e-3", [r"'learning_rate' must be a finite number > 0, got -0.001"]),
    ("learning_rate=fast", [r"'learning_rate' must be float, got 'fast'"]),
    ("group_size=1", [r"'group_size' must be an integer >= 2 \(a group of one has no advantage\), got 1"]),
    ("sample_batch_size=0", [r"'sample_batch_size' must be an integer >= 1, got 0"]),
    ("num_iterations=0", [r"'num_iterations' must be an integer >= 1, got 0"]),
    ("num_steps=2.5", [r"'num_steps' must be int, got 2.5"]),
    ("mixed_precision=fp8", [r"'mixed_precision' must be one of \['no', 'bf16', 'fp16'\], got 'fp8'"]),
    ("lr_scheduler=cosin", [r"'lr_scheduler' must be one of \[.*'cosine'.*\], got 'cosin'"]),
    ("seed=-1", [r"'seed' must be an integer >= 0, got -1"]),
    ("timestep_fraction=1.5", [r"'timestep_fraction' must be a finite number > 0 and <= 1, got 1.5"]),
    ("eval_limit=0", [r"'eval_limit' must be an integer >= 1, got 0"]),
    ("ema_decay=1", [r"'ema_decay' must be a finite number >= 0 and < 1, got 1.0"]),
    ("reward.weights.test-redness=lots", [r"'reward.weights.test-redness' must be float, got 'lots'"]),
    ("reward.weights.test-redness=inf", [r"'reward.weights.test-redness' must be a finite number, got inf"]),
    ("tensorboard=1", [r"'tensorboard' must be true or false, got 1"]),
    ("lerning_rate=1e-3", [r"override lerning_rate=1e-3: unknown key 'lerning_rate'", r"did you mean learning_rate"]),
    ("reward.weigths.x=1", [r"unknown key 'reward.weigths' for RewardConfig", r"did you mean reward.weights"]),
    ("learning_rate", [r"override 'learning_rate' is not of the form key=value"]),
]


@pytest.mark.parametrize(("override", "patterns"), PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_a_bad_override_is_refused_when_parsed(world, capsys, override, patterns):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), override], *patterns)


def test_a_bad_value_in_the_file_names_the_file(world, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text((world / "tiny.toml").read_text().replace("lora_rank = 4", "lora_rank = 0"))
    _fails(capsys, ["grpo", str(bad)], re.escape(str(bad)), r"'lora_rank' must be an integer >= 1, got 0")


def test_an_unknown_key_in_the_file_gets_a_close_match(world, tmp_path, capsys):
    bad = tmp_path / "typo.toml"
    bad.write_text((world / "tiny.toml").read_text().replace("group_size =", "grup_size ="))
    _fails(capsys, ["grpo", str(bad)], re.escape(str(bad)), r"unknown key 'grup_size'", r"did you mean group_size")


def test_a_bad_value_in_a_prompt_source_names_its_index(world, tmp_path, capsys):
    bad = tmp_path / "weight.toml"
    bad.write_text((world / "tiny.toml").read_text().replace('task = "geneval"\n', 'task = "geneval"\nweight = 0\n'))
    _fails(capsys, ["grpo", str(bad)], r"'prompts\[0\]\.weight' must be a finite number > 0, got 0")


@pytest.mark.parametrize("kind", ["missing", "directory", "invalid TOML", "binary"])
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, capsys, kind):
    path = tmp_path / "recipe.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "invalid TOML":
        path.write_text("learning_rate = = 3\n")
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    expected = {"missing": "not found", "directory": "is a directory", "invalid TOML": "invalid TOML",
                "binary": "is not UTF-8 text"}[kind]
    _fails(capsys, ["grpo", str(path)], re.escape(str(path)), expected)


def test_the_other_recipes_share_the_rules(world, tmp_path, capsys):
    _fails(capsys, ["opd", str(world / "tiny.toml"), "learning_rate=0"], r"'learning_rate' must be a finite number > 0")
    sft = tmp_path / "sft.toml"
    sft.write_text("train_batch_size = 0\n")
    _fails(capsys, ["sft", str(sft)], re.escape(str(sft)), r"'train_batch_size' must be an integer >= 1, got 0")
    _fails(capsys, ["pretrain", str(REPO / "training" / "configs" / "mini_pretrain.toml"), "betas=[0.9, 1.5]"],
           r"override betas=\[0.9, 1.5\]: 'betas' must be a finite number >= 0 and < 1, got 1.5")
    _fails(capsys, ["pretrain", str(REPO / "training" / "configs" / "mini_pretrain.toml"), "model.channels=[0, 16]"],
           r"'model.channels' must be an integer >= 1, got 0")


def test_an_unknown_subcommand_gets_a_close_match(capsys):
    assert main(["gpro", "x.toml"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'gpro'" in err and "did you mean 'grpo'" in err and "Traceback" not in err


# ---------------------------------------------------------------- code and names a recipe may not reach


def test_an_import_that_is_not_found_names_the_field(world, capsys):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), 'imports=["no_such_module_here"]'],
           r"imports: cannot import 'no_such_module_here'")


def test_a_sampler_that_is_not_registered_is_refused_before_it_is_imported(world, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))  # what a hostile recipe would name
    bad = tmp_path / "sampler.toml"
    bad.write_text((world / "tiny.toml").read_text().replace('sampler = "mini-world"', 'sampler = "os:system"'))
    _fails(capsys, ["grpo", str(bad), f"output_dir={tmp_path / 'out'}"],
           r"prompts\[0\]\.sampler: unknown prompt sampler 'os:system'", r"known: mini-world")
    assert calls == []


def test_a_sampler_typo_gets_a_close_match(world, tmp_path, capsys):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), "prompts=[{task='x', sampler='mini-wrld'}]",
                    f"output_dir={tmp_path / 'out'}"], r"did you mean 'mini-world'")


# ---------------------------------------------------------------- values that need the recipe's context

RUN_CASES = [
    ("prompts=[{task='x', prompt_set={pth='x.txt', format='lines'}}]",
     [r"unknown key 'prompts\[0\]\.prompt_set\.pth' for PromptSetSpec",
      r"did you mean prompts\[0\]\.prompt_set\.path"]),
    ("prompts=[{task='x', sampler='mini-world', sampler_args={bogus=1}}]",
     [r"prompts\[0\]\.sampler_args: got an unexpected keyword argument 'bogus' \(sampler 'mini-world'\)"]),
    ("prompts=[{task='x', benchmark='no-such-benchmark'}]", [r"unknown benchmark 'no-such-benchmark'"]),
    ("reward.weights.no-such-scorer=1", [r"unknown scorer 'no-such-scorer'"]),
    ("sde_window_size=5",
     [r"sde_window_range must be \[lo, hi\] with lo \+ sde_window_size <= min\(hi, num_steps = 3\)"]),
    ("model=/no/such/model", [r"could not load '/no/such/model'"]),
]


@pytest.mark.parametrize(("override", "patterns"), RUN_CASES, ids=[c[0].split("=")[0] for c in RUN_CASES])
def test_a_bad_value_is_refused_before_the_first_iteration(world, tmp_path, capsys, override, patterns):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={tmp_path / 'out'}", override], *patterns)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------- resume and checkpoints


def test_resume_from_a_directory_without_a_checkpoint(world, tmp_path, capsys):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={tmp_path / 'new'}", f"resume={tmp_path}"],
           r"resume = .*: no training checkpoint there \(expected state/trainer.json\)")


def test_resume_with_a_changed_learning_rate_is_refused(run_copy, world, capsys):
    message = _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={run_copy}", "resume=latest",
                              "num_iterations=3", "learning_rate=0.01"],
                     r"iteration-000002 was written with another config", r"learning_rate = 0.0003 there, 0.01 now",
                     r"Only num_iterations, .* may change")
    assert "num_iterations" not in message.split("Only")[0]  # a changeable field is not among the refused
    assert not (run_copy / "checkpoints" / "iteration-000003").exists()


def test_extending_a_run_under_a_decaying_schedule_is_refused(world, tmp_path, capsys):
    out = tmp_path / "cosine"
    assert main(["grpo", str(world / "tiny.toml"), f"output_dir={out}", "num_iterations=1",
                 "lr_scheduler=cosine"]) == 0
    capsys.readouterr()
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={out}", "num_iterations=2", "lr_scheduler=cosine",
                    "resume=latest"], r"num_iterations 1 -> 2 would reshape lr_scheduler = 'cosine'")


def test_a_fresh_start_into_a_run_directory_is_refused(run_copy, world, capsys):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={run_copy}"],
           r"already holds a run \(newest checkpoint iteration-000002\)", r"resume=latest continues it")
    assert json.loads((run_copy / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 2  # untouched


def test_resume_from_an_older_checkpoint_of_the_same_run_is_refused(run_copy, world, capsys):
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={run_copy}",
                    f"resume={run_copy / 'checkpoints' / 'iteration-000001'}"],
           r"holds checkpoints after iteration 1 \(iteration-000002\)")


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_an_explicit_truncated_checkpoint_is_refused(run_copy, world, tmp_path, capsys):
    checkpoint = run_copy / "checkpoints" / "iteration-000002"
    _truncate(checkpoint / "state" / "adapter_live.safetensors")
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={tmp_path / 'branch'}", "num_iterations=3",
                    f"resume={checkpoint}"],
           r"the checkpoint cannot be read: state/adapter_live.safetensors: truncated")


def test_resume_latest_with_every_checkpoint_corrupt_is_refused(run_copy, world, capsys):
    _truncate(run_copy / "checkpoints" / "iteration-000002" / "state" / "optimizer.pt")
    (run_copy / "checkpoints" / "iteration-000001" / "state" / "trainer.json").write_text("{")
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={run_copy}", "resume=latest", "num_iterations=3"],
           r"no readable checkpoint", r"iteration-000002: state/optimizer.pt", r"iteration-000001: state/trainer.json")
    assert (run_copy / "checkpoints" / "iteration-000002").is_dir()  # nothing set aside when nothing resumes


# ---------------------------------------------------------------- runs that diverge


def test_a_huge_learning_rate_stops_the_run_and_keeps_the_last_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "diverged"
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={out}", "learning_rate=1e30"],
           r"training diverged: the policy's rollouts hold non-finite values",
           r"newest checkpoint kept is .*iteration-000001")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iteration-000001"]


def test_non_finite_weights_stop_the_run_before_they_are_checkpointed(world, tmp_path, capsys):
    out = tmp_path / "nan"
    _fails(capsys, ["grpo", str(world / "tiny.toml"), f"output_dir={out}", "learning_rate=1e20",
                    "max_grad_norm=1e30", "sample_batch_size=1", "updates_per_iteration=2"],
           r"iteration 1: training diverged: train/loss = nan; \d+ of \d+ adapter tensors non-finite",
           r"no checkpoint was written")
    assert not (out / "checkpoints").exists()
    row = json.loads((out / "metrics.jsonl").read_text())  # the diverged iteration is logged, for the post-mortem
    assert row["iteration"] == 1 and row["train/loss"] is None


# ---------------------------------------------------------------- publish


def test_publish_refuses_names_that_escape_the_assets(world, tmp_path, capsys):
    _fails(capsys, ["publish", str(world / "run"), "mini:"], r"'mini:' is not a checkpoint name")
    _fails(capsys, ["publish", str(world / "run"), "mini:../../elsewhere"], r"is not a checkpoint name")


def test_publish_refuses_a_torn_adapter(run_copy, tmp_path, capsys):
    _truncate(run_copy / "checkpoints" / "iteration-000002" / "adapter" / "adapter_model.safetensors", 6)
    _fails(capsys, ["publish", str(run_copy), str(tmp_path / "teacher")],
           r"adapter_model.safetensors: truncated \(6 bytes\); nothing published")
    assert not (tmp_path / "teacher").exists()


def test_publish_refuses_to_replace_a_directory_that_is_not_a_model(world, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    _fails(capsys, ["publish", str(world / "run"), str(home)],
           r"exists and is not a published model \(it holds projects\)")
    assert (home / "projects").is_dir() and (home / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- the real process


def _python(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    tests = str(Path(__file__).resolve().parent)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", "flowopd.train", *args], capture_output=True, text=True, env=environ,
                          cwd=REPO, timeout=300)


def test_the_process_exits_2_with_one_line(world):
    proc = _python(["grpo", str(world / "tiny.toml"), "learning_rate=inf"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: override learning_rate=inf: 'learning_rate' must be a finite number, got inf"]


def test_flowopd_debug_shows_the_traceback(world):
    proc = _python(["grpo", str(world / "tiny.toml"), "learning_rate=inf"], FLOWOPD_DEBUG="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_the_scheduler_choices_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    from flowopd.train.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_every_shipped_recipe_passes_the_rules():
    from flowopd.train.config import load_config
    from flowopd.train.grpo import GRPOConfig
    from flowopd.train.opd import OPDConfig
    from flowopd.train.pretrain import PretrainConfig
    from flowopd.train.sft import SFTConfig

    recipes = sorted((REPO / "training" / "configs").glob("*.toml"))
    assert len(recipes) >= 19
    for path in recipes:
        cls = (PretrainConfig if "pretrain" in path.name else OPDConfig if "opd" in path.name
               else SFTConfig if "sft" in path.name else GRPOConfig)
        load_config(cls, path)  # raises ConfigError naming the field a new rule would refuse
