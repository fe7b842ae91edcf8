"""One telemetry stack per session: the tiny-model service (its own Ray instance, in a subprocess), and a real
Prometheus (the Debian package) scraping both the service's /metrics and Ray's metrics endpoint.

The service runs in a subprocess, not in the pytest process, so that these tests neither collide with the Ray
instance tests/serve keeps for its session nor depend on running before or after it. Its workers have small KV
pools and the scheduler may overcommit them, so the engines really preempt and swap under the Locust load, and
the global queue is short, so a burst gets HTTP 429: every capacity and error metric then has data.

Prometheus is optional: without the binary the Prometheus tests skip (install it with
``apt-get install -y --no-install-recommends prometheus``); everything else still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PRICE_PER_GPU_HOUR = 3.6  # one (pretend) GPU-second costs $0.001
MAX_QUEUED = 4
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"


def get(url: str, timeout: float = 10) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


@dataclass
class Stack:
    url: str  # the service
    ray_metrics_url: str
    model: str
    workers: int
    prometheus_url: str | None
    tmp: Path


def _wait_ready(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The service's READY line (read on a thread, so that a hung start-up cannot block the test run)."""
    found: dict = {}
    done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("READY "):
                found.update(json.loads(line[len("READY "):]))
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout_s)
    if not found:
        raise RuntimeError(f"the tiny service did not start within {timeout_s} s (exit code {proc.poll()})")
    return found


def _stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("telemetry")
    port, ray_port = free_port(), free_port()
    procs = []
    prometheus_url = None
    try:
        if shutil.which("prometheus"):  # first, so that it scrapes everything the tests do
            prom_port = free_port()
            procs.append(subprocess.Popen(
                ["bash", str(ROOT / "scripts/prometheus.sh"), "--service", f"127.0.0.1:{port}",
                 "--ray", f"127.0.0.1:{ray_port}", "--listen", f"127.0.0.1:{prom_port}", "--data",
                 str(tmp / "prometheus"), "--interval", "1s"],
                stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT))
            prometheus_url = f"http://127.0.0.1:{prom_port}"
        env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
        service = subprocess.Popen(
            [PY, str(ROOT / "scripts/tiny_service.py"), "--port", str(port), "--metrics-export-port", str(ray_port),
             "--model-dir", str(tmp / "gpt2-tiny"), "--workers", "2", "--price-per-hour", str(PRICE_PER_GPU_HOUR),
             "--max-queued-requests", str(MAX_QUEUED), "--num-gpu-blocks", "16", "--kv-overcommit", "2",
             "--preemption-policy", "swap", "--num-speculative-tokens", "3"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(tmp / "service.log", "w"), text=True)
        procs.append(service)
        info = _wait_ready(service, 180)
        if prometheus_url:
            _wait_for(lambda: get(f"{prometheus_url}/-/ready", 2), 30, "prometheus ready")
        yield Stack(info["url"], f"http://127.0.0.1:{ray_port}/metrics", info["model"], info["workers"],
                    prometheus_url, tmp)
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="session")
def prometheus(stack) -> str:
    if stack.prometheus_url is None:
        pytest.skip(f"prometheus is not installed ({INSTALL_HINT})")
    return stack.prometheus_url


def _wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


wait_for = _wait_for


# ---------------------------------------------------------------------- reading /metrics
def scrape(url: str) -> list:
    """Every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(get(url).decode()) for s in fam.samples]


def total(samples: list, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def by_replica(samples: list, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name:
            out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def wait_idle(url: str, timeout_s: float = 60) -> list:
    """Until no request is running, waiting or queued anywhere; returns that scrape."""
    def idle():
        samples = scrape(f"{url}/metrics")
        busy = sum(total(samples, f"gpt2serve:{n}") for n in (
            "num_requests_running", "num_requests_waiting", "num_requests_swapped", "scheduler_queue_length",
            "worker_inflight_requests"))
        return samples if busy == 0 else None
    return _wait_for(idle, timeout_s, "the service to go idle")


# ---------------------------------------------------------------------- load, run once per session
@dataclass
class LocustRun:
    returncode: int
    output: str
    stats: list[dict]  # rows of <prefix>_stats.csv
    summary: dict
    html: Path
    csv_prefix: Path


@pytest.fixture(scope="session")
def locust_smoke(stack) -> LocustRun:
    """Locust headless, 10 users for 20 s, streaming completions against the tiny service (the CI smoke)."""
    import csv

    out = stack.tmp / "locust"
    out.mkdir()
    cmd = [PY, "-m", "locust", "-f", str(ROOT / "loadtests/locustfile.py"), "--host", stack.url, "--headless",
           "-u", "10", "-r", "10", "-t", "20s", "--csv", str(out / "smoke"), "--html", str(out / "smoke.html"),
           "--summary-json", str(out / "summary.json"), "--prompt-tokens", "8-48", "--output-tokens", "8-32",
           "--max-token-id", "500", "--request-mix", "stream=8,chat_stream=1,completion=1", "--only-summary"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    rows = []
    if (out / "smoke_stats.csv").exists():
        with open(out / "smoke_stats.csv") as f:
            rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return LocustRun(proc.returncode, proc.stdout + proc.stderr, rows, summary, out / "smoke.html", out / "smoke")


@dataclass
class PrefixReuse:
    prompt_tokens: int  # of all the requests together
    shared_tokens: int  # of each request after the first: its prefix, which the first one left cached
    requests: int
    before: list
    after: list


@pytest.fixture(scope="session")
def prefix_reuse(stack) -> PrefixReuse:
    """Requests sharing a 3-block prefix, one after another: the first computes it, the others find it in the
    cache of the replica that the prefix-aware router sends them to (Locust's random prompts never share one)."""
    import httpx

    before = wait_idle(stack.url)
    prefix = list(range(300, 348))  # 48 tokens: 3 full blocks, in no other test's prompts
    prompts = [prefix + [i, i + 1, i + 2] for i in range(4)]
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for prompt in prompts:
            r = client.post("/v1/completions", json={"model": stack.model, "prompt": prompt, "max_tokens": 4,
                                                     "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200, r.text
    after = wait_idle(stack.url)
    return PrefixReuse(sum(map(len, prompts)), len(prefix), len(prompts), before, after)


@pytest.fixture(scope="session")
def speculation(stack) -> int:
    """Greedy requests whose prompts repeat a phrase: n-gram lookup proposes tokens and the target accepts some
    (the stack's workers speculate 3 tokens a step). Returns the tokens generated."""
    import httpx

    phrase = list(range(400, 407))
    generated = 0
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for i in range(4):
            r = client.post("/v1/completions", json={"model": stack.model, "prompt": phrase * 4 + [i], "max_tokens": 24,
                                                     "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200, r.text
            generated += r.json()["usage"]["completion_tokens"]
    wait_idle(stack.url)
    return generated


@dataclass
class ErrorPaths:
    rejected: int  # HTTP 429 responses seen by the client
    dropped: int  # streams the client closed after their first event
    before: list
    after: list


@pytest.fixture(scope="session")
def error_paths(stack) -> ErrorPaths:
    """A burst bigger than the workers' KV reservations plus the global queue, all at once: the excess gets HTTP
    429; every admitted stream is dropped by the client after its first event, so its worker aborts it."""
    import asyncio

    import httpx

    before = wait_idle(stack.url)
    body = {"model": stack.model, "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True,
            "stream": True}

    async def one(client):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 200:
                async for _ in r.aiter_lines():
                    break  # the first event is in: hang up, 199 tokens early
            return r.status_code

    async def burst():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(client) for _ in range(30)))

    statuses = asyncio.run(burst())
    after = wait_idle(stack.url)
    return ErrorPaths(statuses.count(429), statuses.count(200), before, after)
