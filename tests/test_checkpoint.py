"""The Checkpoint value (flowopd.models.loading): every CHECKPOINT form resolves once to its kind, paths, base and
label; its identity is the one image and score caches were keyed by before the value existed; loaders take the
value or a string alike; a bad argument is refused with one line naming it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from flowopd.bench.cli import main
from flowopd.models import loading
from flowopd.models.loading import load_policy, resolve_checkpoint
from flowopd.models.mini import ASSETS_DIR
from flowopd.models.sd3 import SD35M_ID


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter_copy(root: Path, base: str | None = "keep") -> Path:
    """A copy of the committed mini:grpo-ocr adapter; ``base`` rewrites (or, None, drops) its recorded base."""
    shutil.copytree(ASSETS_DIR / "grpo-ocr", root)
    if base != "keep":
        config = json.loads((root / "adapter_config.json").read_text())
        config.pop("base_model_name_or_path")
        if base is not None:
            config["base_model_name_or_path"] = base
        (root / "adapter_config.json").write_text(json.dumps(config))
    return root


# ---------------------------------------------------------------- each form resolves to its fields


def test_a_committed_mini_model():
    c = resolve_checkpoint("mini:base")
    assert (c.name, c.label, c.kind, c.path, c.base, c.named_local) == (
        "mini:base", "mini:base", "mini", ASSETS_DIR / "base", None, True)
    assert c.is_mini and c.adapter is None and c.hub_id is None


def test_a_committed_mini_adapter_carries_its_resolved_base():
    c = resolve_checkpoint("mini:grpo-ocr")
    assert (c.kind, c.label, c.adapter, c.path) == ("lora", "mini:grpo-ocr", *[ASSETS_DIR / "grpo-ocr"] * 2)
    assert c.base == resolve_checkpoint("mini:base") and c.is_mini


def test_a_mini_directory_absolute_or_relative(tmp_path, monkeypatch):
    shutil.copytree(ASSETS_DIR / "base", tmp_path / "m")
    c = resolve_checkpoint(str(tmp_path / "m"))
    assert (c.kind, c.label, c.path, c.named_local, c.hub_id) == (
        "mini", str(tmp_path / "m"), tmp_path / "m", True, None)
    monkeypatch.chdir(tmp_path)
    c = resolve_checkpoint("m")  # a relative directory that exists is local, although its name could be a hub id
    assert (c.kind, c.named_local, c.hub_id, c.is_mini) == ("mini", False, None, True)


def test_a_hub_id_and_a_diffusers_directory(tmp_path):
    hub = resolve_checkpoint("org/model")
    assert (hub.kind, hub.label, hub.hub_id, hub.named_local, hub.base, hub.is_mini) == (
        "sd3", "org/model", "org/model", False, None, False)
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text("{}")
    local = resolve_checkpoint(str(tmp_path / "sd3"))
    assert (local.kind, local.path, local.hub_id, local.is_mini) == ("sd3", tmp_path / "sd3", None, False)


def test_an_adapter_takes_its_base_from_the_flag_else_its_config_else_sd35m(tmp_path):
    shutil.copytree(ASSETS_DIR / "base", tmp_path / "m")
    recorded = resolve_checkpoint(str(_adapter_copy(tmp_path / "a")))
    assert recorded.kind == "lora" and recorded.adapter == tmp_path / "a" and recorded.base.label == "mini:base"
    flagged = resolve_checkpoint(str(tmp_path / "a"), base=str(tmp_path / "m"))
    assert (flagged.base.label, flagged.base.kind, flagged.is_mini) == (str(tmp_path / "m"), "mini", True)
    unrecorded = resolve_checkpoint(str(_adapter_copy(tmp_path / "b", base=None)))
    assert (unrecorded.base.hub_id, unrecorded.base.kind, unrecorded.is_mini) == (SD35M_ID, "sd3", False)


def test_run_and_training_checkpoint_directories_resolve_to_an_adapter(tmp_path):
    run = tmp_path / "run"
    for it in (1, 2):
        _adapter_copy(run / "checkpoints" / f"iteration-00000{it}" / "adapter")
    newest = run / "checkpoints" / "iteration-000002" / "adapter"
    c = resolve_checkpoint(str(run))
    assert (c.name, c.label, c.path, c.kind) == (str(run), str(newest), newest, "lora")
    first = resolve_checkpoint(str(run / "checkpoints" / "iteration-000001"))
    assert first.label == str(run / "checkpoints" / "iteration-000001" / "adapter")
    assert resolve_checkpoint(str(newest)).label == str(newest)  # an adapter directory is recorded as given


def test_the_value_is_frozen():
    c = resolve_checkpoint("mini:base")
    with pytest.raises(AttributeError):
        c.kind = "sd3"  # type: ignore[misc]


# ---------------------------------------------------------------- identity: what the caches keyed on


def test_the_identity_is_what_image_and_score_caches_were_keyed_by():
    # the form generation.json, <benchmark>.key.json and results.json hold since issue 19: a local model by the
    # sha256 of its model files (README.md and train_log.csv are not model files), an adapter with its base's
    # identity, a hub model by id and the revision in the local cache
    base = {"kind": "local", "path": str((ASSETS_DIR / "base").resolve()),
            "files": {f: _sha256(ASSETS_DIR / "base" / f) for f in ("config.json", "model.safetensors")}}
    assert resolve_checkpoint("mini:base").identity == base
    adapter = ASSETS_DIR / "grpo-ocr"
    assert resolve_checkpoint("mini:grpo-ocr").identity == {
        "kind": "local", "path": str(adapter.resolve()),
        "files": {f: _sha256(adapter / f) for f in ("adapter_config.json", "adapter_model.safetensors")},
        "base": base,
    }
    assert resolve_checkpoint("org/model").identity == {"kind": "hub", "id": "org/model", "revision": "unresolved"}


def test_a_copied_run_has_the_identity_of_its_adapter_but_its_own_path(tmp_path):
    run = tmp_path / "run"
    _adapter_copy(run / "checkpoints" / "iteration-000001" / "adapter")
    identity, committed = resolve_checkpoint(str(run)).identity, resolve_checkpoint("mini:grpo-ocr").identity
    assert identity["files"] == committed["files"] and identity["base"] == committed["base"]
    assert identity["path"] == str((run / "checkpoints" / "iteration-000001" / "adapter").resolve())


def test_the_identity_hashes_the_files_once(monkeypatch):
    calls = []
    fingerprint = loading.file_fingerprint
    monkeypatch.setattr(loading, "file_fingerprint", lambda path: calls.append(path) or fingerprint(path))
    c = resolve_checkpoint("mini:grpo-ocr")
    assert c.identity is c.identity and c.base.identity is c.identity["base"]
    assert len(calls) == 4  # two adapter files and the base's two, each hashed once


# ---------------------------------------------------------------- loaders take the value


def test_load_policy_takes_the_value_or_a_string_alike():
    by_name = load_policy("mini:grpo-ocr").net.state_dict()
    by_value = load_policy(resolve_checkpoint("mini:grpo-ocr")).net.state_dict()
    assert by_name.keys() == by_value.keys() and all(torch.equal(by_name[k], by_value[k]) for k in by_name)
    base = load_policy(resolve_checkpoint("mini:base")).net.state_dict()
    assert any(not torch.equal(base[k], by_value[k]) for k in base)  # the adapter was merged into its base


def test_evaluate_refuses_a_base_beside_a_resolved_checkpoint():
    from flowopd.bench.evaluate import evaluate

    with pytest.raises(ValueError, match=r"base 'mini:base' goes with a CHECKPOINT string; mini:grpo-ocr is resolved"):
        evaluate(resolve_checkpoint("mini:grpo-ocr"), ["mini-ocr"], base="mini:base")


# ---------------------------------------------------------------- bad arguments: one line naming them


def _one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["evaluate", *argv, "--benchmarks", "mini-ocr", "--limit", "1", "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_empty_checkpoint_is_refused(capsys):
    assert "CHECKPOINT '': empty" in _one_line(capsys, "")


def test_a_run_directory_without_checkpoints_is_refused(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = _one_line(capsys, str(tmp_path / "run"))
    assert f"{tmp_path / 'run'}: a training run directory without checkpoints" in line


def test_a_pretrain_run_directory_is_its_final_model(tmp_path):
    """pretrain writes the final model.safetensors + config.json beside its resumable checkpoints/step_N.pt: the
    directory is evaluated as that model, and the resumable states are no part of its identity."""
    run = tmp_path / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ASSETS_DIR / "base" / f, run / f)
    (run / "checkpoints" / "step_0000010.pt").write_bytes(b"resumable state")
    ckpt = resolve_checkpoint(str(run))
    assert (ckpt.kind, ckpt.path) == ("mini", run)
    assert sorted(ckpt.identity["files"]) == ["config.json", "model.safetensors"]
    assert ckpt.identity["files"] == resolve_checkpoint("mini:base").identity["files"]


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "adapter_config.json: not valid JSON"),
    ('["mini:base"]', "adapter_config.json: expected a JSON object, got list"),
])
def test_an_unreadable_adapter_config_is_refused_naming_the_file(capsys, tmp_path, content, needle):
    adapter = _adapter_copy(tmp_path / "a")
    (adapter / "adapter_config.json").write_text(content)
    assert f"{adapter / needle}" in _one_line(capsys, str(adapter))


def test_an_unreadable_mini_config_is_refused_naming_the_file(capsys, tmp_path):
    shutil.copytree(ASSETS_DIR / "base", tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert f"{tmp_path / 'm' / 'config.json'}: not valid JSON" in _one_line(capsys, str(tmp_path / "m"))


def test_a_base_for_a_checkpoint_that_is_no_adapter_is_refused(capsys):
    line = _one_line(capsys, "mini:base", "--base", "mini:grpo-ocr")
    assert "--base mini:grpo-ocr: only a LoRA adapter checkpoint takes a base model, not mini:base" in line


def test_a_missing_local_checkpoint_resolves_but_is_refused_by_name(tmp_path):
    for name in ("mini:no-such-model", str(tmp_path / "nope")):
        c = resolve_checkpoint(name)  # a loader then says what it looked for (the trainers' model= messages)
        assert c.named_local and c.hub_id is None
        with pytest.raises(FileNotFoundError, match=f"{name}: no such checkpoint"):
            c.check_exists()
        with pytest.raises(FileNotFoundError, match=f"{name}: no such checkpoint"):
            c.identity  # noqa: B018 - the property raises


def test_a_file_or_a_directory_without_model_files_has_no_identity(tmp_path):
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="file.safetensors: a file; a checkpoint is a directory"):
        resolve_checkpoint(str(tmp_path / "file.safetensors")).identity  # noqa: B018
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no model files"):
        resolve_checkpoint(str(tmp_path / "empty")).identity  # noqa: B018

