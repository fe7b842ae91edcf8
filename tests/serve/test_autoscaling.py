"""Workers scale with engine load (the custom policy), and a scaled-down worker drains without failing requests.

A second application in the session's Serve instance, with an autoscaling worker deployment: one replica at
rest, two under a load of 10 long requests against a target of 2 per replica. When the load stops, Serve
takes one replica away; the scheduler must stop routing to it as soon as Serve does (before it drains), its
idle channels must close so the drain ends early, and no request may fail on the way.
"""

import asyncio
import time

import httpx
import pytest

from tests.serve.conftest import run

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "gpt2-autoscale"
MODEL = "tiny-autoscale"


@pytest.fixture(scope="module")
def autoscaled(service):
    from ray import serve

    from gpt2serve import serve_app

    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    engine = service.engine.model_copy(update={"max_num_seqs": 4}).model_dump(mode="json")
    serve.run(serve_app.build_app({
        "engine": engine, "served_model_name": MODEL, "heartbeat_interval_s": 0.2, "channel_idle_s": 1.0,
        "ingress": quarter, "scheduler": quarter,
        "worker": {**quarter, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 30,
                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                          "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                                          "metrics_interval_s": 0.5, "look_back_period_s": 2}},
    }), name=APP, route_prefix="/autoscale")
    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP)
    yield scheduler
    serve.delete(APP)


def workers(scheduler) -> set[str]:
    return set(scheduler.snapshot.remote().result()["workers"])


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_workers_scale_up_under_load_and_down_without_failing_requests(service, autoscaled):
    scheduler = autoscaled
    first = wait_for(lambda: workers(scheduler), 60, "the first worker")
    assert len(first) == 1
    url = service.proxy_url + "/autoscale/v1/completions"  # a second application: reached by route prefix
    body = {"model": MODEL, "prompt": "def main(", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    results: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def client(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await c.post(url, json=body)
            results.append((r.status_code, r.json().get("usage", {}).get("completion_tokens", 0)))

    async def load() -> set[str]:
        async with httpx.AsyncClient(timeout=120) as c:
            clients = [asyncio.create_task(client(c)) for _ in range(10)]
            deadline = time.monotonic() + 120
            while len(await asyncio.to_thread(workers, scheduler)) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            scaled = await asyncio.to_thread(workers, scheduler)
            stop.set()
            await asyncio.gather(*clients)
        return scaled

    scaled = run(load())
    assert len(scaled) == 2, "10 requests against a target of 2 per replica should add the second worker"
    assert results and all(r == (200, 300) for r in results), results

    # Idle again: Serve removes one replica, which the scheduler stops routing to, and which then drains.
    def one_worker() -> set[str] | None:
        current = workers(scheduler)
        return current if len(current) == 1 else None

    remaining = wait_for(one_worker, 120, "scale-down to 1")
    snap = scheduler.snapshot.remote().result()
    assert snap["routable"] == sorted(remaining)
    with httpx.Client(timeout=60) as c:
        for _ in range(3):
            r = c.post(url, json={**body, "max_tokens": 8})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
