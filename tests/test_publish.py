"""publish: a run's newest adapter (or a pretrained mini model) installed under a checkpoint name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.publish import model_files, publish


def _adapter(path, tag):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "tag": tag}))
    _weights(path / "adapter_model.safetensors", tag)


def _weights(path, tag):
    """A (whole) safetensors file whose one tensor spells ``tag``."""
    save_file({"tag": torch.tensor(list(tag.encode()), dtype=torch.uint8)}, str(path))


def _tag(path):
    return bytes(load_file(str(path))["tag"].tolist()).decode()


def test_a_run_publishes_its_newest_checkpoint_and_keeps_the_readme(tmp_path):
    run = tmp_path / "run"
    for it, tag in ((12, "old"), (36, "new")):
        _adapter(run / "checkpoints" / f"iteration-{it:06d}" / "adapter", tag)
    dest = tmp_path / "models" / "teacher"
    dest.mkdir(parents=True)
    (dest / "README.md").write_text("how it was made")
    _weights(dest / "adapter_model.safetensors", "stale")
    assert train_main(["publish", str(run), str(dest)]) == 0
    assert _tag(dest / "adapter_model.safetensors") == "new"
    assert (dest / "README.md").read_text() == "how it was made"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["teacher"]  # no temporary left behind


def test_a_mini_model_directory_publishes_its_weights(tmp_path):
    src = tmp_path / "pretrain"
    src.mkdir()
    (src / "config.json").write_text("{}")
    _weights(src / "model.safetensors", "w")
    (src / "train_log.csv").write_text("step,loss\n")
    assert [p.name for p in model_files(src)] == ["config.json", "model.safetensors"]
    dest = publish(src, tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]


def test_nothing_to_publish_names_the_directory(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without checkpoints"):
        model_files(tmp_path / "run")
    assert train_main(["publish", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    assert "nothing to publish" in capsys.readouterr().err
