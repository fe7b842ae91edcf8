"""One real Ray Serve application with the tiny model, started once for the whole tests/serve session.

Starting Ray and Serve costs ~15 s, so every end-to-end test shares this app:
a local Ray instance with auth off, replicas reserving a quarter CPU each, the HTTP proxy on a free port of
127.0.0.1 (other people's services on this machine may hold 8000). Tests that break the app (killing
workers) live in test_worker_death.py, which runs last.

The session's application serves HTTP from its ingress replica itself (``http_listener``, as the shipped configs
do: actors/http_listener.py); the side applications (``side_app``) are reached through Serve's HTTP proxy by route
prefix, so both paths run the serving tests. ``GPT2SERVE_TEST_VIA=proxy`` sends the session's tests through the
proxy too; ``GPT2SERVE_TEST_VIA=direct-ingress`` through Serve's direct ingress (the replica on a port of
Serve's choosing, from 30000 up).
"""

import asyncio
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
VIA = os.environ.get("GPT2SERVE_TEST_VIA", "listener")
assert VIA in ("listener", "proxy", "direct-ingress"), f"GPT2SERVE_TEST_VIA={VIA!r}"
DIRECT_INGRESS = VIA == "direct-ingress"
if DIRECT_INGRESS:  # read by every Ray process at import: must be set before ray.init
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"

from tests.conftest import engine_config, free_port  # noqa: E402

APP_NAME = "gpt2-test"
MODEL_NAME = "tiny-gpt2"
# Two workers of 8 sequence slots each and a global queue of 16: 20 concurrent streams all fit (16 running,
# 4 waiting), while a burst of 60 long requests overflows the queue.
ENGINE_OVERRIDES = dict(num_gpu_blocks=256, max_num_seqs=8, max_num_batched_tokens=256)
NUM_WORKERS = 2
MAX_QUEUED = 16
CHANNEL_IDLE_S = 2.0


@dataclass
class Service:
    base_url: str  # where the tests send requests: the ingress replica's own listener, or Serve's proxy
    proxy_url: str  # Serve's HTTP proxy (every application, by route prefix)
    engine: Any  # EngineConfig of the workers, for offline reference runs
    app: str = APP_NAME  # the Serve application (another one than the session's: test_prefix_routing.py)

    def scheduler_snapshot(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("Scheduler", app_name=self.app).snapshot.remote().result()

    def worker_stats(self) -> dict[str, dict]:
        """Every routed worker's own stats, asked of that replica (pinned call)."""
        from ray import serve

        handle = serve.get_deployment_handle("ModelWorker", app_name=self.app)
        return {wid: handle.stats.remote(replica=wid).result(timeout_s=30)
                for wid in self.scheduler_snapshot()["workers"]}

    def wait_for_workers(self, n: int, timeout_s: float = 90, exclude: set[str] = frozenset()) -> set[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = set(self.scheduler_snapshot()["workers"]) - set(exclude)
            if len(workers) >= n:
                return workers
            time.sleep(0.2)
        raise AssertionError(f"{n} workers did not register within {timeout_s} s: {self.scheduler_snapshot()}")

    def wait_idle(self, timeout_s: float = 20) -> dict[str, dict]:
        """Until every worker holds no request, every KV block is free again, and the scheduler holds no
        reservation (releases are fire-and-forget, so they may land a moment after the worker is done)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.worker_stats()
            snap = self.scheduler_snapshot()
            if (all(s["num_free_blocks"] == s["num_total_blocks"] and not s["active_request_ids"]
                    for s in stats.values()) and snap["num_assigned"] == 0 and snap["num_waiting"] == 0):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"service did not go idle: {stats} {snap}")
            time.sleep(0.1)


@contextmanager
def side_app(service: Service, name: str, route: str, engine: dict, workers: int = 1, **settings):
    """Another application beside the session's, on the same Serve instance (quarter-CPU replicas, fast
    heartbeats, any other ``settings`` of ``ServiceConfig``): yields its ``Service`` once its workers
    registered, deletes it afterwards."""
    from ray import serve

    from gpt2serve import serve_app

    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    serve.run(serve_app.build_app({
        "engine": engine, "served_model_name": MODEL_NAME, "heartbeat_interval_s": 0.2,
        "channel_idle_s": CHANNEL_IDLE_S, "ingress": quarter, "scheduler": quarter,
        "worker": {**quarter, "num_replicas": workers}, **settings}), name=name, route_prefix=route)
    svc = Service(service.proxy_url + route, service.proxy_url, service.engine, app=name)
    try:
        svc.wait_for_workers(workers)
        yield svc
    finally:
        serve.delete(name)


@pytest.fixture(scope="session")
def service(tiny_model_dir):
    import ray
    from ray import serve

    from gpt2serve import serve_app

    engine = engine_config(tiny_model_dir, **ENGINE_OVERRIDES)
    port, listener_port = free_port(), free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        quarter = {"ray_actor_options": {"num_cpus": 0.25}}
        app = serve_app.build_app({
            "engine": engine.model_dump(mode="json"), "served_model_name": MODEL_NAME,
            "max_queued_requests": MAX_QUEUED, "heartbeat_interval_s": 0.2, "worker_timeout_s": 5,
            "channel_idle_s": CHANNEL_IDLE_S,
            "ingress": quarter, "scheduler": quarter,
            **({"http_listener": {"host": "127.0.0.1", "port": listener_port}} if VIA == "listener" else {}),
            # Replace dead workers quickly: Serve notices through its health check.
            "worker": {**quarter, "num_replicas": NUM_WORKERS, "health_check_period_s": 1},
        })
        serve.run(app, name=APP_NAME, route_prefix="/")
        proxy = f"http://127.0.0.1:{port}"
        base = {"listener": f"http://127.0.0.1:{listener_port}", "proxy": proxy}.get(VIA) or _direct_ingress_url(
            str(tiny_model_dir))
        svc = Service(base, proxy, engine)
        svc.wait_for_workers(NUM_WORKERS)
        yield svc
    finally:
        serve.shutdown()
        ray.shutdown()


def _direct_ingress_url(model_root: str) -> str:
    """The port our ingress replica listens on (Serve picks one from 30000 up): the one serving our model."""
    import httpx

    for port in range(30000, 31000):
        try:
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5).json()
        except (httpx.HTTPError, ValueError):
            continue
        if models.get("data", [{}])[0].get("root") == model_root:
            return f"http://127.0.0.1:{port}"
    raise RuntimeError("no direct-ingress replica serves the test model")


# ---------------------------------------------------------------------- SSE helpers
def parse_sse(lines) -> list[Any]:
    """Server-sent events → decoded JSON payloads, with "[DONE]" kept as the string."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def stream_events(client, path: str, body: dict, **kwargs) -> tuple[int, list[Any]]:
    async with client.stream("POST", path, json=body, **kwargs) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(await r.aread())]
        return 200, parse_sse([line async for line in r.aiter_lines()])


def run(coro):
    return asyncio.run(coro)
