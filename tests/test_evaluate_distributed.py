"""``evaluate`` sharded over processes (flowopd.bench.distributed): 2 CPU processes under torchrun (gloo) make the
images and per-sample rows of 1 process, a killed 2-process run resumes as a 1-process run without regenerating
its finished images, row files of any process count are merged, and a broken launch environment is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from flowopd.bench.cli import main
from flowopd.bench.distributed import SINGLE, Shard, pending_batches, process_device, shard_from_env

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("mini-geneval", "mini-pick", "mini-ocr")  # mini-pick scores mini-geneval's images
# 2 prompts each: 4 mini-geneval images (2 batches of 2) and 12 mini-ocr images (6 batches), so that both
# processes generate and score; the rows are scored in batches of 2 x --batch-size
ARGS = ["--benchmarks", ",".join(BENCHMARKS), "--limit", "2", "--batch-size", "2", "--no-progress"]


def _torchrun(script: list[str], out: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script,
           *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


def _evaluate_in_process(out: Path, *extra: str) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): the same float rounding
    try:
        assert main(["evaluate", *ARGS, *extra, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(previous)


def _rows(out: Path, name: str) -> pd.DataFrame:
    df = pd.read_parquet(out / "scores" / f"{name}.parquet")
    return df.drop(columns=["file"]).sort_values(["index", "sample"]).reset_index(drop=True)


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The 1-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("single") / "run"
    _evaluate_in_process(out)
    return out


def test_two_processes_make_the_images_and_rows_of_one(single, tmp_path):
    out = tmp_path / "two"
    done = _torchrun(["-m", "flowopd.bench", "evaluate"], out)
    table = [line for line in done.stdout.splitlines() if line.startswith("| mini-geneval") and "| mean |" in line]
    assert len(table) == 1 and done.stdout.count("results: ") == 1  # printed once, by rank 0
    assert _pngs(out) == _pngs(single)
    assert len(_pngs(out)) == 4 + 12
    for name in BENCHMARKS:
        pd.testing.assert_frame_equal(_rows(out, name), _rows(single, name))
        assert not list((out / "scores").glob(f"{name}.partial*"))  # the row files were merged, then removed
    one, two = (json.loads((run / "results.json").read_text()) for run in (single, out))
    assert one["metrics"] == two["metrics"]
    assert {b["processes"] for b in one["benchmarks"].values()} == {1}
    assert {b["processes"] for b in two["benchmarks"].values()} == {2}


def test_killed_two_process_run_resumes_as_one_process_without_regenerating(single, tmp_path):
    out = tmp_path / "killed"
    done = _torchrun([str(REPO / "tests" / "_evaluate_killer.py"), "mini-ocr"], out, check=False)
    assert done.returncode != 0, done.stdout
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").rglob("*.png")}
    ocr_before = [p for p in before if "mini-ocr" in p.parts]
    assert 1 <= len(ocr_before) < 12, "rank 1 dies after its first mini-ocr image, before the set is complete"
    assert len(before) - len(ocr_before) == 4  # mini-geneval was finished (and scored) before the kill

    _evaluate_in_process(out)

    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # reused, not made again
    assert _pngs(out) == _pngs(single)
    for name in BENCHMARKS:
        pd.testing.assert_frame_equal(_rows(out, name), _rows(single, name))
    results = json.loads((out / "results.json").read_text())
    assert {b["processes"] for b in results["benchmarks"].values()} == {1}  # the run that wrote results.json


def test_row_files_of_any_process_count_are_merged_not_rescored(single, tmp_path, monkeypatch):
    """Rows left by a killed run - rank 0's file, rank 1's file ending in a cut line - are merged by a resumed
    run with another process count; only the batches (of 4 rows here) holding an image without a row are scored
    again, and the rows they already had are not written twice."""
    import flowopd.bench.scoring as scoring

    out = tmp_path / "rows"
    _evaluate_in_process(out, "--benchmarks", "mini-ocr")
    scores = out / "scores"
    rows = pd.read_parquet(scores / "mini-ocr.parquet").to_dict("records")
    (scores / "mini-ocr.parquet").unlink()
    (scores / "mini-ocr.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (scores / "mini-ocr.partial.rank1.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[4:7]) + json.dumps(rows[7])[:25])
    loaded: list[str] = []
    real_load_png = scoring.load_png
    monkeypatch.setattr(scoring, "load_png", lambda path: loaded.append(Path(path).name) or real_load_png(path))

    _evaluate_in_process(out, "--benchmarks", "mini-ocr")

    assert loaded == [Path(r["file"]).name for r in rows[4:]]  # batches 4-7 (the cut row 7) and 8-11
    pd.testing.assert_frame_equal(_rows(out, "mini-ocr"), _rows(single, "mini-ocr"))
    assert not list(scores.glob("mini-ocr.partial*"))


def test_work_is_the_fresh_run_batches_holding_pending_items_dealt_round_robin():
    items = list(range(11))
    assert pending_batches(items, 3, set(items)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert pending_batches(items, 3, {4, 9}) == [[3, 4, 5], [9, 10]]  # whole batches, as a fresh run cuts them
    assert pending_batches(items, 3, set()) == []
    batches = pending_batches(items, 3, set(items))
    assert SINGLE.share(batches) == batches
    shares = [Shard(rank=r, world_size=3).share(batches) for r in range(3)]
    assert shares == [[[0, 1, 2], [9, 10]], [[3, 4, 5]], [[6, 7, 8]]]
    assert Shard(rank=5, world_size=8).share(batches) == []
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        pending_batches(items, 0, set(items))


def test_each_process_gets_its_local_gpu():
    assert process_device("cuda", 3, 8) == "cuda:3"
    assert process_device("cpu", 3, 8) == "cpu"
    assert process_device("cuda:1", 0, 1) == "cuda:1"  # one process: the device as given


@pytest.mark.parametrize(
    ("env", "device", "message"),
    [
        ({"WORLD_SIZE": "two"}, "cpu", "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "cpu", "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "cpu", "RANK=2 must be in [0, WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2"}, "cpu", "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "cpu", "LOCAL_RANK='x' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "cpu", "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "cuda:1",
         "--device cuda:1 with WORLD_SIZE=2: pass --device cuda"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "mps",
         "several processes need --device cpu or cuda"),
    ],
)
def test_a_broken_launch_environment_is_refused_in_one_line(env, device, message, monkeypatch, tmp_path, capsys):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as e:
        shard_from_env(device)
    assert message in str(e.value)
    if device == "cpu":  # (the CLI refuses a CUDA device on this CPU machine before it reads the environment)
        assert main(["evaluate", "--benchmarks", "mini-ocr", "--device", device, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "images").exists()  # refused before any work
