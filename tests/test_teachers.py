"""The teachers of OPD and SFT (flowopd.train.teachers): the router sends each sample to its task's teacher
adapter, every adapter must share the student's base network, and the memory that sharing saves."""

from __future__ import annotations

from pathlib import Path

import pytest
from _fixtures import mini_world_with_adapters, random_adapter, student_with_teachers
from safetensors.torch import load_file

from flowopd.train.config import ConfigError
from flowopd.train.lora import unwrap
from flowopd.train.teachers import route_to_teacher, shared_base_memory

_student = student_with_teachers


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory) -> dict[str, Path]:
    return mini_world_with_adapters(tmp_path_factory.mktemp("mini_world"))


def test_router_sends_every_sample_to_its_task_teacher(mini_world):
    adapters = {"geneval": "teacher_geneval", "ocr": "teacher_ocr"}
    metas = [{"task": t, "prompt": f"p{i}"} for i, t in enumerate(["ocr", "geneval", "ocr", "ocr", "geneval"])]
    assert [route_to_teacher(m, adapters) for m in metas] == [adapters[m["task"]] for m in metas]
    with pytest.raises(KeyError, match="no teacher for task 'pick'.*teachers.pick"):
        route_to_teacher({"task": "pick", "prompt": "x"}, adapters)
    # two tasks sharing one checkpoint share one adapter; the anchor may reuse a teacher's adapter
    teachers = {"geneval": str(mini_world["geneval"]), "ocr": str(mini_world["ocr"]),
                "quality": str(mini_world["geneval"])}
    _, model, tset = _student(mini_world, teachers, anchor=str(mini_world["ocr"]))
    assert tset.adapter_of == {"geneval": "teacher_geneval", "ocr": "teacher_ocr", "quality": "teacher_geneval"}
    assert tset.anchor == "teacher_ocr" and tset.frozen == ["teacher_geneval", "teacher_ocr"]
    assert set(unwrap(model).peft_config) == {"default", "teacher_geneval", "teacher_ocr"}
    metas = [{"task": t} for t in ["quality", "ocr", "geneval", "ocr", "quality", "geneval"]]
    routes = tset.routes(metas)
    assert {k: v.tolist() for k, v in routes.items()} == {"teacher_geneval": [0, 2, 4, 5], "teacher_ocr": [1, 3]}
    for name, idx in routes.items():
        assert all(tset.adapter_of[metas[i]["task"]] == name for i in idx.tolist())


def test_teachers_must_share_the_students_base(mini_world, tmp_path):
    from flowopd.models.mini import load_mini

    other = random_adapter(load_mini(mini_world["base"]).net, tmp_path / "other", "mini:elsewhere", seed=3)
    with pytest.raises(ConfigError, match="share one base network"):
        _student(mini_world, {"geneval": str(other)})


def test_memory_saved_is_n_full_float32_copies_minus_the_adapters(mini_world):
    from flowopd.models.mini import load_mini

    teachers = {t: str(mini_world[t]) for t in ("geneval", "ocr", "quality", "pick")}
    _, model, tset = _student(mini_world, teachers)
    memory = shared_base_memory(model, tset.frozen)
    base = sum(p.numel() for p in load_mini(mini_world["base"]).net.parameters())
    weights = load_file(mini_world["ocr"] / "adapter_model.safetensors")
    adapter = sum(t.numel() * t.element_size() for t in weights.values())
    assert memory["base_parameters"] == base and memory["copies"] == 4
    assert memory["full_copies_bytes"] == 4 * base * 4 and memory["adapter_bytes"] == 4 * adapter
    assert memory["saved_bytes"] == 4 * base * 4 - 4 * adapter > 0
