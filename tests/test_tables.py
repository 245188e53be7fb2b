"""The paper's tables: every mini row has a recipe that publishes it, --retrain runs what is missing, and the
sd35m preset without weights stops at once naming the missing checkpoints and the config to edit."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowopd.bench.report import load_table
from flowopd.paper.__main__ import main as paper_main
from flowopd.paper.checkpoints import MissingCheckpointsError
from flowopd.paper.recipes import retrain
from flowopd.paper.tables import resolve_rows
from flowopd.train.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("table1", "table2", "table3")


@pytest.mark.parametrize("name", TABLES)
def test_every_mini_row_has_a_recipe_that_publishes_its_checkpoint(name):
    for row in load_table(name)["rows"]:
        recipe = row["recipe"]["mini"]
        assert recipe, row["label"]
        for command in recipe:
            words = shlex.split(command)
            assert words[0] in COMMANDS, command
            if words[0] in ("pretrain", "grpo", "opd", "sft"):
                assert (ROOT / words[1]).is_file(), command
        last = shlex.split(recipe[-1])
        if last[0] == "publish":
            assert last[2] == row["run"]["mini"], row["label"]
        else:  # the merge writes its output under the row's name itself
            assert last[0] == "merge" and last[last.index("--out") + 1] == row["run"]["mini"]


def test_retrain_runs_only_the_missing_rows_recipe(tmp_path):
    src = tmp_path / "run" / "checkpoints" / "iteration-000002" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(src / "adapter_model.safetensors"))  # publish checks the file is whole
    present = tmp_path / "present"
    present.mkdir()
    (present / "adapter_config.json").write_text('{"kept": true}')
    missing = tmp_path / "missing"
    table = {"name": "t", "rows": [
        {"label": "present", "run": {"mini": str(present)},
         "recipe": {"mini": [f"publish {tmp_path / 'run'} {present}"]}},
        {"label": "missing", "run": {"mini": str(missing)},
         "recipe": {"mini": [f"publish {tmp_path / 'run'} {missing}"]}},
    ]}
    retrain(table, "mini")
    assert (missing / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert (present / "adapter_config.json").read_text() == '{"kept": true}'  # not retrained
    retrain(table, "mini", force=True)
    assert (present / "adapter_config.json").read_text() == "{}"
    table["rows"][1]["recipe"]["mini"] = [f"publish {tmp_path / 'nothing'} {tmp_path / 'x'}"]
    with pytest.raises(RuntimeError, match="failed with exit code 2"):
        retrain(table, "mini", force=True)


def test_sd35m_without_weights_names_every_missing_checkpoint_and_the_config(tmp_path, capsys):
    config = tmp_path / "mine.toml"
    config.write_text('[checkpoints]\n"SD3.5-M (base)" = "/nowhere/sd35m"\n"+ GRPO-OCR" = "/nowhere/ocr"\n')
    with pytest.raises(MissingCheckpointsError) as err:
        resolve_rows(load_table("table1"), "sd35m", config)
    text = str(err.value)
    for row in load_table("table1")["rows"]:
        assert repr(row["label"]) in text
    assert "/nowhere/ocr" in text and str(config) in text
    t0 = time.perf_counter()
    assert paper_main(["table", "table1", "--preset", "sd35m", "--config", str(config)]) == 2
    assert time.perf_counter() - t0 < 5  # stops at once: nothing is loaded or generated
    assert "missing checkpoints" in capsys.readouterr().err


def test_sd35m_without_a_config_says_which_file_to_write(tmp_path):
    with pytest.raises(MissingCheckpointsError, match="no such file; copy reports/sd35m_checkpoints.toml"):
        resolve_rows(load_table("table2"), "sd35m", tmp_path / "absent.toml")
