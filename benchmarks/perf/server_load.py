"""Load test of the scorer server: many concurrent clients on loopback, no reset, no lost request, bounded memory.

``python benchmarks/perf/server_load.py [--clients 50] [--requests 4] [--out reports/server-load.md]``

Starts ``python -m flowopd.scorers.server`` (default settings: 2 workers, a queue of 64, backlog 128) on
127.0.0.1 with a weight-free scorer defined here (:class:`MeanScorer`, registered with ``--register``), so
that the server itself is measured, not a model. Three phases, each against a fresh server:

1. ``typical``: ``--clients`` threads, each sending ``--requests`` requests of 8 images of 64x64, all at once,
   with a plain ``http.client`` connection and no retry, so every reset, refusal or 503 counts as a failure;
   every answer must carry the scores of its own images (each client sends different images).
2. ``at the limits``: 5 clients, then ``--clients``, each sending one request at the server's default pixel
   budget (64 noise images of 512x512, ~67 MB of JSON; the limit on bytes is raised to carry it): the
   server's peak memory must stay near ``workers`` requests' worth, the same for 5 clients as for 50.
3. ``overload``: a server with ``--queue-size 4`` and clients using ``RemoteScorer`` (retries with backoff):
   the server answers 503 when its queue is full, the clients retry, and no request is lost.

The server's peak resident memory is its ``VmHWM`` from /proc (Linux). The script talks only to 127.0.0.1,
bounds every request (timeout) and the whole run (``--time-limit``), and stops its servers when it ends.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowopd.scorers.base import Scale, ScoreBatch, check_images

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOST = "127.0.0.1"  # loopback only, by construction


class MeanScorer:
    """Mean pixel value of each image (float32, to 1e-6): a real computation on the decoded pixels, no model."""

    name = "load-mean"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> ScoreBatch:
        return ScoreBatch(check_images(images).mean(dim=(1, 2, 3)).double().numpy())  # no float64 copy


def start_server(extra: Sequence[str], timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """A server subprocess on 127.0.0.1 and a free port; returns (process, port) once it serves."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowopd.scorers.server", "load-mean", "--register", "load-mean=server_load:MeanScorer",
         "--host", HOST, "--port", "0", "--log-level", "WARNING", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving "):
            url = line.split(" at ")[1].split()[0]
            assert url.startswith(f"http://{HOST}:"), url
            return proc, int(url.rsplit(":", 1)[1])
    proc.kill()
    raise RuntimeError(f"the scorer server did not start: {proc.stderr.read()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in kB (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def make_request(seed: int, n: int, side: int) -> tuple[bytes, np.ndarray]:
    """A /score body of n random side x side images, and the mean brightness the scorer must answer."""
    arrays = np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    body = json.dumps({"images": [png_b64(a) for a in arrays], "prompts": [f"client {seed}"] * n}).encode()
    want = arrays.reshape(n, -1).astype(np.float64).mean(axis=1) / 255.0
    return body, want


def post(port: int, body: bytes, timeout: float) -> tuple[int, Any]:
    """One POST /score on a fresh connection, no retry: (status, answer) or (-1, the connection error)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/score", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    except (OSError, http.client.HTTPException) as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def run_clients(n_clients: int, work: Any, deadline: float) -> list[Any]:
    """Start ``n_clients`` threads at once (a barrier), each running ``work(client)``; join by the deadline."""
    results: list[Any] = [None] * n_clients
    barrier = threading.Barrier(n_clients)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


def raw_phase(name: str, extra: Sequence[str], requests: list[list[tuple[bytes, np.ndarray]]],
              deadline: float, timeout: float) -> dict[str, Any]:
    """Every client sends its requests one after the other over plain connections; everything is counted."""
    proc, port = start_server(extra)
    try:
        idle = memory_kb(proc.pid)
        start = time.monotonic()

        def work(i: int) -> list[tuple[str, float]]:
            outcomes = []
            for body, want in requests[i]:
                t0 = time.monotonic()
                status, answer = post(port, body, timeout)
                if status == 200:
                    ok = np.allclose(np.asarray(answer["scores"], dtype=float), want, atol=1e-6)
                    outcome = "ok" if ok else "wrong scores"
                elif status == -1:
                    outcome = f"connection error ({answer.split(':')[0]})"
                else:
                    outcome = f"HTTP {status}"
                outcomes.append((outcome, time.monotonic() - t0))
            return outcomes

        results = run_clients(len(requests), work, deadline)
        wall = time.monotonic() - start
        peak = memory_kb(proc.pid)
    finally:
        stop_server(proc)
    flat = [o for r in results if r for o in r]
    counts = Counter(o for o, _ in flat)
    sent = sum(len(r) for r in requests)
    counts["not answered (client still waiting at the deadline)"] = sent - len(flat)
    latencies = np.array([t for _, t in flat]) if flat else np.zeros(1)
    return {"phase": name, "clients": len(requests), "requests": sent,
            "body_mb": sum(len(b) for r in requests for b, _ in r) / sent / 1e6,
            "outcomes": {k: v for k, v in counts.items() if v}, "wall_s": wall,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
            "max_s": float(latencies.max()), "idle_rss_mb": idle["VmRSS"] / 1024, "peak_rss_mb": peak["VmHWM"] / 1024}


def overload_phase(n_clients: int, n_requests: int, deadline: float, timeout: float) -> dict[str, Any]:
    """A small queue: 503s are expected; RemoteScorer's retries must bring every request home."""
    from flowopd.scorers.client import RemoteScorer

    proc, port = start_server(["--queue-size", "4", "--workers", "1"])
    url = f"http://{HOST}:{port}"
    try:
        start = time.monotonic()

        def work(i: int) -> list[str]:
            images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(i))
            try:
                remote = RemoteScorer(url, timeout=timeout, startup_wait=0, retries=12)
                want = images.mul(255).round().div(255).double().mean(dim=(1, 2, 3)).numpy()
                out = []
                for _ in range(n_requests):
                    got = remote.score(images, [f"client {i}"] * 8, [{}] * 8).scores
                    out.append("ok" if np.allclose(got, want, atol=1e-6) else "wrong scores")
                return out
            except Exception as e:  # reported, not raised: the count is the result
                return [f"{type(e).__name__}: {str(e)[:80]}"]

        results = run_clients(n_clients, work, deadline)
        wall = time.monotonic() - start
        health = json.loads(post_get(port, "/health", timeout))
        peak = memory_kb(proc.pid)
    finally:
        stop_server(proc)
    counts = Counter(o for r in results if r for o in r)
    counts["not answered (client still waiting at the deadline)"] = n_clients * n_requests - sum(
        len(r) for r in results if r)
    return {"phase": "overload (queue 4, 1 worker, RemoteScorer retries)", "clients": n_clients,
            "requests": n_clients * n_requests, "outcomes": {k: v for k, v in counts.items() if v}, "wall_s": wall,
            "busy_refusals": health["busy_refusals"], "peak_rss_mb": peak["VmHWM"] / 1024}


def post_get(port: int, path: str, timeout: float) -> bytes:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def report(rows: list[dict[str, Any]], argv: Sequence[str], total_s: float) -> str:
    lines = [
        "# Scorer server under load",
        "",
        "Made by `python benchmarks/perf/server_load.py " + " ".join(shlex.quote(a) for a in argv) + "` "
        f"({total_s:.0f} s in all) on {os.cpu_count()} CPU cores shared with other work; the server and the "
        "clients run on the same machine, over 127.0.0.1. The scorer is the script's weight-free `MeanScorer`: "
        "what is measured is the server (queue, workers, limits, decoding), not a model.",
        "",
        "| phase | clients | requests | MB per request | outcomes | wall (s) | latency p50 / p95 / max (s) | "
        "server RSS idle -> peak (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
        if "p50_s" in r:
            lat = f"{r['p50_s']:.2f} / {r['p95_s']:.2f} / {r['max_s']:.2f}"
            mem = f"{r['idle_rss_mb']:.0f} -> {r['peak_rss_mb']:.0f}"
            size = f"{r['body_mb']:.2f}"
        else:
            lat, mem, size = "-", f"peak {r['peak_rss_mb']:.0f}", "0.04"
            outcomes += f" (server answered 503 {r['busy_refusals']} times, all retried)"
        lines.append(f"| {r['phase']} | {r['clients']} | {r['requests']} | {size} | {outcomes} | {r['wall_s']:.1f} "
                     f"| {lat} | {mem} |")
    lines += [
        "",
        "How to read it: every phase starts a fresh server with its default settings (2 workers, a queue of 64, "
        "backlog 128) unless the phase says otherwise. In every phase but the overload one the clients use plain "
        "connections with no retry, so a reset, a refused connection, a 503, a wrong score or a request still "
        "unanswered at the deadline would each be counted as an outcome other than `ok`. Latency includes the wait in "
        "the queue. RSS is the server process's resident memory after start-up (idle) and its peak (VmHWM) over the "
        "phase. docs/scorers/server.md gives the bound: at most `workers` requests in memory, each about 3 x its JSON "
        "size while parsing and 15 bytes per decoded pixel, plus the scorer's own allocations.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, typical phase (default: 4)")
    parser.add_argument("--heavy-images", type=int, default=64,
                        help="512x512 noise images per request in the 'at the limits' phase (default: 64)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop after this many seconds in all")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, help="write the markdown report here (e.g. reports/server-load.md)")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 500 or not 1 <= args.requests <= 100 or not 1 <= args.heavy_images <= 64:
        parser.error("--clients 1-500, --requests 1-100 and --heavy-images 1-64")
    start = time.monotonic()
    deadline = start + args.time_limit

    typical = [[make_request(1000 * i + k, 8, 64) for k in range(args.requests)] for i in range(args.clients)]
    rows = [raw_phase("typical (8 images of 64x64)", [], typical, deadline, args.timeout)]
    print(json.dumps(rows[-1]), flush=True)
    del typical

    heavy_body, heavy_want = make_request(7, args.heavy_images, 512)  # one body, shared by every client
    for clients in sorted({min(5, args.clients), args.clients}):
        rows.append(raw_phase(f"at the limits ({args.heavy_images} noise images of 512x512)",
                              ["--max-request-bytes", str(len(heavy_body) + 1)],
                              [[(heavy_body, heavy_want)] for _ in range(clients)], deadline, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    del heavy_body

    rows.append(overload_phase(args.clients, 2, deadline, args.timeout))
    print(json.dumps(rows[-1]), flush=True)

    text = report(rows, list(argv if argv is not None else sys.argv[1:]), time.monotonic() - start)
    print(text)
    if args.out:
        args.out.write_text(text)
    failed = any(k != "ok" for r in rows for k in r["outcomes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
