"""The scorer server and RemoteScorer: a served scorer is indistinguishable from the in-process one.

The server runs as a real subprocess (``python -m flowopd.scorers.server``) serving a weight-free test scorer
(tests/_server_scorer.py) registered with ``--register``.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _server_scorer import BrightnessScorer
from PIL import Image

from flowopd.scorers import SCORERS, Scorer
from flowopd.scorers.client import RemoteScorer, RemoteScorerError, ScorerServerUnreachable
from flowopd.scorers.envs import SCORER_ENVS, serve_session, server_command
from flowopd.scorers.server import (
    ServerConfigError,
    is_loopback,
    main,
    make_server,
    parse_option,
    parse_registration,
)
from flowopd.scorers.wire import decode_batch, decode_png, encode_batch, encode_png, quantise_uint8

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCORER_ARGS = ["test-brightness", "--register", "test-brightness=_server_scorer:BrightnessScorer"]
MAX_BATCH = 4
MAX_REQUEST_BYTES = 200_000
OFFSET = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "flowopd.scorers.server", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def _read_url(proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> str:
    """The URL from the server's 'serving ... at URL' line."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("serving "):
                return line.split(" at ")[1].split()[0]
    proc.kill()
    raise AssertionError(f"the server did not start; its log:\n{log.read_text()}")


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)
    return proc.returncode, out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = _start(
        [
            *SCORER_ARGS,
            "--port",
            "0",
            "--max-batch",
            str(MAX_BATCH),
            "--max-request-bytes",
            str(MAX_REQUEST_BYTES),
            "--option",
            f"offset={OFFSET}",
            "--log-level",
            "WARNING",
        ],
        log,
    )
    url = _read_url(proc, log)
    yield url
    code, out = _stop(proc, signal.SIGINT)
    assert code == 0 and "shut down" in out, log.read_text()


@pytest.fixture(scope="module")
def remote(server) -> RemoteScorer:
    return RemoteScorer(server, timeout=30, startup_wait=5)


def _images(n: int, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _png_b64(arr: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url: str, body: Any) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/score", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _same(a: Any, b: Any) -> bool:
    """Equality with NaN == NaN (and the same type, so None is not NaN); numpy scalars as Python ones."""
    a, b = (x.item() if isinstance(x, np.generic) else x for x in (a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _assert_same(remote_batch, local_batch) -> None:
    np.testing.assert_array_equal(remote_batch.scores, local_batch.scores)  # exact; NaN == NaN here
    assert remote_batch.details.keys() == local_batch.details.keys()
    for key, values in local_batch.details.items():
        got = remote_batch.details[key]
        assert len(got) == len(values) and all(map(_same, got, values)), (key, got, values)


# -- wire format -------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact_and_quantisation_is_idempotent():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    np.testing.assert_array_equal(decode_png(encode_png(arr), 0), arr)
    x = _images(3)
    q = quantise_uint8(x)
    assert q.dtype == torch.float32 and q.shape == x.shape
    assert torch.equal(quantise_uint8(q), q)
    assert (q - x).abs().max() <= 0.5 / 255 + 1e-7


def test_score_json_encodes_nan_as_null_and_keeps_infinities():
    from flowopd.scorers.base import ScoreBatch

    batch = ScoreBatch(
        np.array([0.5, np.nan, np.inf, -np.inf]),
        {"n": [np.int64(1), 2, 3, 4], "x": [np.float32(0.25), np.float64("nan"), None, True]},
    )
    body = encode_batch(batch)
    assert body["scores"] == [0.5, None, "inf", "-inf"]
    assert body["details"]["x"] == [0.25, None, None, True] and body["nonfinite"] == {"x": {"1": "nan"}}
    back = decode_batch(json.loads(json.dumps(body, allow_nan=False)))
    np.testing.assert_array_equal(back.scores, batch.scores)
    assert back.details["n"] == [1, 2, 3, 4]
    assert all(map(_same, back.details["x"], [0.25, math.nan, None, True]))


# -- the served scorer -------------------------------------------------------------------------------------


def test_remote_scores_equal_in_process_scores_on_quantised_images(remote):
    assert isinstance(remote, Scorer)
    assert (remote.name, remote.version, remote.higher_is_better) == ("test-brightness", "1", True)
    assert (remote.scale.low, remote.scale.high) == (0.0, 1.0)
    images = _images(7, h=20, w=24)  # 7 > max_batch: the client splits into 4 + 3
    prompts = [f"prompt {i}" for i in range(6)] + ['caf\u00e9 \u2615 "quoted"']
    metadata = [{"skip": i == 2, "tag": "counting"} for i in range(7)]
    before = remote.health()
    got = remote.score(images, prompts, metadata)
    after = remote.health()
    want = BrightnessScorer(offset=OFFSET).score(quantise_uint8(images), prompts, metadata)
    _assert_same(got, want)
    assert np.isnan(got.scores[2]) and got.details["summary"][6].startswith('caf\u00e9 \u2615 "quoted"')
    assert after["requests"] - before["requests"] == 2 and after["images"] - before["images"] == 7


def test_client_splits_by_request_bytes(remote):
    # 128x128 noise: ~66 kB of base64 each, so at most two fit under the server's 200 kB limit
    images = _images(4, h=128, w=128, seed=1)
    prompts, metadata = ["p"] * 4, [{}] * 4
    before = remote.health()["requests"]
    got = remote.score(images, prompts, metadata)
    assert remote.health()["requests"] - before >= 2
    _assert_same(got, BrightnessScorer(offset=OFFSET).score(quantise_uint8(images), prompts, metadata))
    with pytest.raises(RemoteScorerError, match="alone .* exceeds the server's max_request_bytes"):
        remote.score(_images(1, h=300, w=300, seed=2), ["p"], [{}])


def test_bad_payloads_get_400_and_the_server_keeps_serving(server, remote):
    good = encode_png(np.zeros((8, 8, 3), np.uint8))
    cases = {
        b"{not json": "not valid JSON",
        json.dumps({"images": ["%%%not base64"], "prompts": ["a"]}).encode(): "image 0: not valid base64",
        json.dumps(
            {"images": [good, base64.b64encode(b"GIF89a....").decode()], "prompts": ["a", "b"]}
        ).encode(): "image 1: not a PNG",
        json.dumps(
            {"images": [_png_b64(np.zeros((8, 8), np.uint8), "L")], "prompts": ["a"]}
        ).encode(): "expected an 8-bit RGB PNG, got mode 'L'",
        json.dumps(
            {"images": [good, encode_png(np.zeros((4, 8, 3), np.uint8))], "prompts": ["a", "b"]}
        ).encode(): "share one size",
        json.dumps(
            {"images": [good], "prompts": ["a", "b"]}
        ).encode(): "'prompts' must be a list of 1 strings",
        json.dumps({"images": [], "prompts": []}).encode(): "non-empty list",
    }
    for body, message in cases.items():
        status, answer = _post(server, body)
        assert status == 400 and message in answer["error"], (body[:60], answer)
    status, answer = _post(server, {"images": [good], "prompts": ["a"]})  # metadata may be left out
    assert status == 200 and answer["scores"] == [pytest.approx(OFFSET)]
    assert remote.score(_images(1), ["a"], [{}]).scores.shape == (1,)


def test_too_many_images_or_bytes_get_413(server):
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    status, answer = _post(server, {"images": [png] * (MAX_BATCH + 1), "prompts": ["a"] * (MAX_BATCH + 1)})
    assert status == 413 and f"max_batch={MAX_BATCH}" in answer["error"]
    status, answer = _post(server, {"images": [png], "prompts": ["x" * MAX_REQUEST_BYTES]})
    assert status == 413 and f"max_request_bytes={MAX_REQUEST_BYTES}" in answer["error"]
    assert _post(server, {"images": [png], "prompts": ["a"]})[0] == 200


def test_scorer_error_gives_500_with_its_message(remote):
    with pytest.raises(
        RemoteScorerError, match="500: .*ValueError: metadata asked this scorer to fail"
    ) as info:
        remote.score(_images(2), ["a", "b"], [{}, {"fail": True}])
    assert info.value.status == 500
    assert remote.score(_images(2), ["a", "b"], [{}, {}]).scores.shape == (2,)


def test_dead_port_gives_a_clear_error_quickly():
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ScorerServerUnreachable) as info:
        RemoteScorer(url, startup_wait=0.5, expected_name="deqa")
    assert time.monotonic() - start < 5
    assert (
        f"scorer server at {url} is not reachable: start it with `python -m flowopd.bench serve deqa`"
        in str(info.value)
    )


def test_mini_geneval_served_equals_in_process_and_sigterm_shuts_down_cleanly(tmp_path):
    from flowopd.world import grammar, render
    from flowopd.world.scorers import MiniGenEvalScorer

    metas = grammar.prompt_set("geneval", "test")[::16] + [grammar.prompt_set("ocr", "test")[0]]
    images = render.render_batch(metas, np.random.default_rng(0))
    images[2] = 1.0  # blank: nothing to detect
    images = (images + 0.01 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    prompts = [m["prompt"] for m in metas]
    port = _free_port()
    log = tmp_path / "server.log"
    proc = _start(["mini-geneval", "--port", str(port)], log)
    try:
        # the server is still importing torch: the client's first connections are refused and retried
        remote = RemoteScorer(f"http://127.0.0.1:{port}", startup_wait=60, expected_name="mini-geneval")
        got = remote.score(images, prompts, metas)
    finally:
        code, out = _stop(proc, signal.SIGTERM)
    want = MiniGenEvalScorer().score(quantise_uint8(images), prompts, metas)
    _assert_same(got, want)
    assert got.scores[2] == 0.0 and math.isnan(got.scores[-1]) and math.isnan(got.details["partial"][-1])
    assert code == 0, log.read_text()
    assert f"serving 'mini-geneval' at http://127.0.0.1:{port}" in out and "shut down" in out
    assert "received SIGTERM" in log.read_text()


# -- command line, binding, environments --------------------------------------------------------------------


def test_cli_option_parsing_and_unknown_scorer(capsys):
    assert parse_option("batch_size=8") == ("batch_size", 8)
    assert parse_option("device=cuda:1") == ("device", "cuda:1")
    assert parse_option("amp=false") == ("amp", False)
    assert parse_option("scale=[512, 512]") == ("scale", [512, 512])
    assert parse_registration("x=pkg.mod:Cls") == ("x", "pkg.mod:Cls")
    for bad, parse in (("novalue", parse_option), ("x=pkg.mod", parse_registration)):
        with pytest.raises(Exception, match="expected"):
            parse(bad)
    assert main(["no-such-scorer", "--port", "0"]) == 2
    assert "unknown scorer 'no-such-scorer'" in capsys.readouterr().err


def test_binding_beyond_loopback_needs_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")
    with pytest.raises(ServerConfigError, match="refusing to serve on 0.0.0.0, beyond loopback, without a token"):
        make_server(BrightnessScorer(), host="0.0.0.0", port=0)
    make_server(BrightnessScorer(), host="0.0.0.0", port=0, token="x" * 16).server_close()
    make_server(BrightnessScorer(), port=0).server_close()


class _FakeSession:
    def __init__(self, posargs: list[str]) -> None:
        self.posargs = posargs
        self.calls: list[tuple[str, tuple, dict]] = []

    def install(self, *args: str, **kwargs: Any) -> None:
        self.calls.append(("install", args, kwargs))

    def run(self, *args: str, **kwargs: Any) -> None:
        self.calls.append(("run", args, kwargs))

    def error(self, message: str) -> None:
        raise RuntimeError(message)


def test_serve_session_installs_the_pins_then_serves():
    with pytest.raises(RuntimeError, match="--trust-remote-code"):
        serve_session(_FakeSession([]), "deqa")
    session = _FakeSession(["--trust-remote-code", "--port", "8766"])
    serve_session(session, "deqa")
    (kind1, pins, _), (kind2, local, _), (kind3, cmd, _) = session.calls
    assert kind1 == kind2 == "install" and kind3 == "run"
    assert "transformers==4.36.1" in pins and "torch==2.1.2" in pins and local == ("--no-deps", "-e", ".")
    assert cmd == ("python", "-m", "flowopd.scorers.server", "deqa", "--trust-remote-code", "--port", "8766")
    session = _FakeSession([])
    serve_session(session, "geneval-mmdet")
    build = session.calls[1]
    assert build[1][0] == "--no-build-isolation" and "mmcv-full==1.7.1" in build[1]
    assert build[2]["env"] == {"MMCV_WITH_OPS": "1", "FORCE_CUDA": "1"}
    assert session.calls[-1][1][-2:] == ("--option", "detector=mmdet")
    with pytest.raises(KeyError, match="no pinned environment 'nope'"):
        serve_session(_FakeSession([]), "nope")


@pytest.mark.parametrize("name", sorted(SCORER_ENVS))
def test_scorer_envs_match_the_registered_scorers(name):
    env = SCORER_ENVS[name]
    assert env.scorer in SCORERS
    assert any(r.startswith("torch==") for r in env.requirements), "flowopd.scorers imports torch: pin it"
    assert server_command(name)[:4] == ["python", "-m", "flowopd.scorers.server", env.scorer]
    try:
        cls = SCORERS.get(env.scorer)
    except ImportError as e:  # the scorer module is not written yet
        pytest.skip(f"{env.scorer}: {e}")
    params = inspect.signature(cls).parameters
    wanted = set(env.options) | ({"trust_remote_code"} if env.needs_remote_code else set())
    assert wanted <= set(params), f"{cls.__name__} takes no {wanted - set(params)}"
