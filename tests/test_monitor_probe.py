"""The probe set of the reward-hacking monitor (flowopd/train/probe.py, issue 23): its values are the mini scorers'
on the probe's prompts and seeds, it draws no random number, a tiny GRPO run trains the same adapter with it on or
off and logs it at the iterations due, bad settings are refused by name, and ``diagnostics monitor`` plots it."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_runs import tiny_base, tiny_recipe
from safetensors.torch import load_file

from flowopd.bench.images import sample_seed
from flowopd.bench.spec import get_spec
from flowopd.models.mini import load_mini
from flowopd.sampling import sample_ode
from flowopd.scorers import build_scorer
from flowopd.train.__main__ import main as train_main
from flowopd.train.diagnostics import main as diagnostics_main
from flowopd.train.probe import PROBE_BENCHMARKS, Probe, probe_indices
from flowopd.world.grammar import prompt_set


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return load_mini(str(tiny_base(tmp_path_factory.mktemp("probe") / "base")))


def _rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_probe_scores_train_prompts_with_the_specs_settings_and_draws_nothing(tiny_policy, one_thread):
    probe = Probe(4)
    before = _rng_states()
    got = probe(tiny_policy)
    after = _rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert sorted(got) == sorted(f"monitor/probe/{b}" for b in PROBE_BENCHMARKS)

    # the same prompts, seeds and settings, sampled and scored here without the probe
    train = {"mini-geneval": prompt_set("geneval", "train"), "mini-ocr": prompt_set("ocr", "train")}
    assert probe_indices(len(train["mini-geneval"]), 4) == [0, 20, 40, 60]
    images = {}
    for owner, every in train.items():
        gen = get_spec(owner).generation
        indices = probe_indices(len(every), 4)
        prompts = [every[i] for i in indices]
        assert [m["prompt"] for m in probe.image_sets[owner].prompts] == [m["prompt"] for m in prompts]
        seeds = [sample_seed(gen.seed, f"monitor-probe/{owner}", i, 0) for i in indices]
        cond = tiny_policy.encode_prompts([m["prompt"] for m in prompts])
        noise = tiny_policy.initial_noise(seeds, gen.height, gen.width)
        images[owner] = (sample_ode(tiny_policy, cond, noise, gen.steps, gen.guidance_scale), prompts)
    assert images["mini-geneval"][0].shape == (4, 3, 32, 32)
    for name, owner in [("mini-geneval", "mini-geneval"), ("mini-ocr", "mini-ocr"),
                        ("mini-quality", "mini-geneval"), ("mini-pick", "mini-geneval")]:
        x, prompts = images[owner]
        scores = build_scorer(name).score(x, [m["prompt"] for m in prompts], prompts).scores
        assert got[f"monitor/probe/{name}"] == float(np.mean(scores)), name
    # never a test prompt of mini-ocr (its train and test strings are disjoint)
    test_texts = {m["text"] for m in prompt_set("ocr", "test")}
    assert not {m["text"] for m in Probe(16).image_sets["mini-ocr"].prompts} & test_texts


def test_probe_indices_cover_the_geneval_tags():
    every = prompt_set("geneval", "train")
    tags = {every[i]["tag"] for i in probe_indices(len(every), 16)}
    assert len(tags) == 6  # the first 16 train prompts would hold three tags only
    with pytest.raises(ValueError, match="cannot take 81 of 80"):
        probe_indices(80, 81)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(root: Path, out: str, *overrides: str) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["grpo", str(tiny_recipe(root)), f"output_dir={root / out}", "num_iterations=3",
                           "save_every=3", *overrides]) == 0
    finally:
        torch.set_num_threads(previous)
    return root / out


def test_a_grpo_run_trains_the_same_with_the_probe_and_logs_it_when_due(tmp_path):
    off = _train(tmp_path, "off")
    on = _train(tmp_path, "on", "monitor_probe_every=2", "monitor_probe_prompts=2")
    last = "checkpoints/iteration-000003"
    for name in ("state/adapter_live.safetensors", "adapter/adapter_model.safetensors", "state/ema.safetensors",
                 "state/rng_0.safetensors"):  # the adapter, its EMA, and the global torch generator's state
        a, b = (load_file(str(r / last / name)) for r in (off, on))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # numpy's and Python's global generators, and the run's prompt/noise generator
    assert (off / last / "state/rng_0.json").read_text() == (on / last / "state/rng_0.json").read_text()
    sampler = [json.loads((r / last / "state/trainer.json").read_text())["sampler_rng"] for r in (off, on)]
    assert sampler[0] == sampler[1]

    rows_off, rows_on = _rows(off), _rows(on)
    probed = [r["iteration"] for r in rows_on if "monitor/probe/mini-geneval" in r]
    assert probed == [0, 2, 3]  # a fresh run's start, every 2 iterations, the last
    for row in rows_on:
        keys = {k for k in row if k.startswith("monitor/probe/")}
        assert keys == (set() if row["iteration"] not in probed else {f"monitor/probe/{b}" for b in PROBE_BENCHMARKS})
        assert ("time/probe_s" in row) == (row["iteration"] in probed)
    assert 1 <= rows_on[0]["monitor/probe/mini-quality"] <= 5 and 0 <= rows_on[0]["monitor/probe/mini-pick"] <= 10

    def trained(rows):  # every metric but the probe's and the timings, of the trained iterations
        return [{k: v for k, v in r.items() if not k.startswith(("monitor/probe/", "time/"))}
                for r in rows if r["iteration"] >= 1]

    assert trained(rows_on) == trained(rows_off) and len(trained(rows_off)) == 3

    # the probe's fields may change on resume (they train nothing): the resumed run probes as it now says
    _train(tmp_path, "off", "num_iterations=4", "resume=latest", "monitor_probe_every=4", "monitor_probe_prompts=3")
    assert [r["iteration"] for r in _rows(off) if "monitor/probe/mini-ocr" in r] == [4]  # not 0: no fresh start
    log = json.loads((off / "resume_log.jsonl").read_text())
    assert log["changed"] == {"num_iterations": [3, 4], "monitor_probe_every": [0, 4], "monitor_probe_prompts": [16, 3]}


def test_the_plot_adds_one_panel_per_probe_benchmark(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn: list[list[str]] = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append([ax.get_title() for ax in fig.axes if ax.axison])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iteration": i, "reward/total": 0.1 * i, "monitor/blank_rate": 0.0, "monitor/group_diversity": 0.2,
             "monitor/image_std": 0.3} for i in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert diagnostics_main(["monitor", str(run), "--out", str(tmp_path / "plain.png")]) == 0
    probe = {f"monitor/probe/{b}": 0.5 for b in PROBE_BENCHMARKS}
    rows = [{"iteration": 0, **probe}, *rows[:2], {**rows[2], **probe}, rows[3]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert diagnostics_main(["monitor", str(run), "--out", str(tmp_path / "probe.png")]) == 0
    assert (tmp_path / "probe.png").stat().st_size > 1000
    monitor = ["reward/total", "monitor/blank_rate", "monitor/group_diversity", "monitor/image_std"]
    assert drawn == [monitor, monitor + [f"monitor/probe/{b}" for b in PROBE_BENCHMARKS]]


def _refused(capsys, argv: list[str], *patterns: str) -> None:
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])


@pytest.mark.parametrize("override, patterns", [
    ("monitor_probe_every=-1", [r"'monitor_probe_every' must be an integer >= 0 \(0 = off\), got -1"]),
    ("monitor_probe_every=often", [r"'monitor_probe_every' must be int, got 'often'"]),
    ("monitor_probe_prompts=0", [r"'monitor_probe_prompts' must be an integer >= 1, got 0"]),
    ("monitor_probe_prompts=2.5", [r"'monitor_probe_prompts' must be int, got 2.5"]),
])
def test_bad_probe_values_are_refused_by_name(tmp_path, capsys, override, patterns):
    _refused(capsys, ["grpo", str(tiny_recipe(tmp_path)), override], *patterns)
    assert not (tmp_path / "run").exists()


def test_more_probe_prompts_than_the_train_split_has_are_refused(tmp_path, capsys):
    _refused(capsys, ["grpo", str(tiny_recipe(tmp_path)), "monitor_probe_every=1", "monitor_probe_prompts=81"],
             r"monitor_probe_prompts = 81: mini-geneval has 80 prompts on the train split; use at most 80")


def test_the_probe_is_refused_on_a_model_outside_the_mini_world(tmp_path, capsys):
    _refused(capsys, ["grpo", str(tiny_recipe(tmp_path)), "model=stabilityai/stable-diffusion-3.5-medium",
                      "monitor_probe_every=6"],
             r"monitor_probe_every = 6", r"not a mini model", r"eval_every / eval_benchmarks", r"SD3\.5-M")



def test_the_mini_recipes_probe_and_the_sd35m_ones_do_not():
    import tomllib

    from flowopd.train.probe import check_probe

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    mini = {p.name for p in [*root.glob("mini_grpo_*.toml"), *root.glob("mini_opd_*.toml")]}
    assert len(mini) >= 9
    for path in sorted(root.glob("*.toml")):
        recipe = tomllib.loads(path.read_text())
        every = recipe.get("monitor_probe_every", 0)
        assert every == (6 if path.name in mini else 0), path.name
        if "model" in recipe:
            check_probe(recipe["model"], every)  # a probe only on a mini model
