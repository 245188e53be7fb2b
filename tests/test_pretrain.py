"""The pretraining recipe through its real entry point, resume, the config loader and the dispatcher."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.models.mini import load_mini
from flowopd.train.__main__ import main as train_main
from flowopd.train.config import ConfigError, load_config
from flowopd.train.pretrain import PretrainConfig, lr_at

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training" / "configs" / "mini_pretrain.toml"
# A tiny network and batch so that a step takes milliseconds; the recipe is the committed one.
TINY = [
    "model.channels=[8,16,16]", "model.text_dim=16", "model.text_layers=1", "model.heads=2",
    "model.cond_dim=16", "model.groups=4", "batch_size=16", "warmup_steps=5", "threads=1",
]


def _losses(run: Path) -> list[float]:
    with (run / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_entry_point_runs_20_steps_and_loss_falls(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowopd.train", "pretrain", str(CONFIG), "max_steps=20", "checkpoint_every=10",
           f"out={out}", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = _losses(out)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    policy = load_mini(out)
    assert policy.net.config.channels == [8, 16, 16]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000010.pt", "step_0000020.pt"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, restore_threads) -> None:
    args = [str(CONFIG), "max_steps=6", "checkpoint_every=3", "ema_decay=0.9", *TINY]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train_main(["pretrain", *args, f"out={full}"]) == 0
    # simulate a crash after the step-3 checkpoint: later checkpoint, final model and log rows are lost
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / "step_0000006.pt").unlink()
    (resumed / "model.safetensors").unlink()
    assert train_main(["pretrain", *args, f"out={resumed}"]) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(full) and len(_losses(full)) == 6


def test_lr_schedule_warms_up_and_decays() -> None:
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


@dataclass
class _Inner:
    width: int = 4
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Outer:
    name: str = "run"
    lr: float = 1e-3
    flag: bool = False
    limit: float | None = None
    inner: _Inner = field(default_factory=_Inner)


def test_config_file_and_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "a"\nlr = 1\n[inner]\nwidth = 8\n')
    cfg = load_config(_Outer, path, ["inner.sizes=[3, 4]", "flag=true", "name=true", "limit=0.5", "lr=2e-4"])
    assert cfg == _Outer(name="true", lr=2e-4, flag=True, limit=0.5, inner=_Inner(8, [3, 4]))
    assert isinstance(cfg.lr, float)
    assert load_config(_Outer, path, ["limit=none", "name=runs/x y"]).name == "runs/x y"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.widht=3", r"unknown key 'inner.widht'.*did you mean inner.width"),
        ("lr=fast", r"'lr' must be float"),
        ("flag=1", r"'flag' must be true or false"),
        ("inner=3", r"'inner' must be a table"),
        ("noequals", r"key=value"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_Outer, None, [override])


def test_config_file_unknown_key_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("max_step = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'max_step'.*did you mean max_steps"):
        load_config(PretrainConfig, path)


def test_committed_config_is_the_recipe_of_the_committed_base() -> None:
    import dataclasses
    import json

    from flowopd.models.mini import ASSETS_DIR

    cfg = dataclasses.asdict(load_config(PretrainConfig, CONFIG))
    made_with = json.loads((ASSETS_DIR / "base" / "config.json").read_text())["extra"]["pretrain"]
    for key in ("out", "steps_done", "wall_seconds"):
        cfg.pop(key, None), made_with.pop(key, None)
    assert cfg == made_with


def test_dispatcher_rejects_unknown_subcommand(capsys) -> None:
    assert train_main(["pretrian", str(CONFIG)]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'pretrian'" in err and "did you mean 'pretrain'" in err
    assert "pretrain" in err.split("known:")[1]
