"""A model worker that dies mid-request, or whose engine steps raise or hang: its requests end at once with a
retryable error, and Serve replaces it.

Runs last (file order): it kills the session's workers. The raising and hanging steps are injected on an
application of their own (``fault_injection: true``, one worker, fast health checks), which also shows the
queue timeout.
"""

import asyncio
import json
import time

import httpx
import pytest
import ray

from tests.serve.conftest import MODEL_NAME, NUM_WORKERS, parse_sse, side_app

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]
FAULTS_APP = "gpt2-faults"
SHORT = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 8, "temperature": 0}
LONG = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 500, "ignore_eos": True}


def holder(stats: dict[str, dict], request_prefix: str) -> str | None:
    """The worker holding the request whose X-Request-Id was ``request_prefix``."""
    for wid, s in stats.items():
        if any(rid.startswith(request_prefix) for rid in s["active_request_ids"]):
            return wid
    return None


async def wait_until_held(service, prefix: str, timeout_s: float = 30) -> str:
    for _ in range(int(timeout_s / 0.1)):
        wid = holder(await asyncio.to_thread(service.worker_stats), prefix)
        if wid is not None:
            return wid
        await asyncio.sleep(0.1)
    raise AssertionError(f"no worker holds {prefix}")


def test_killed_workers_fail_their_requests_fast_and_are_replaced(service):
    service.wait_idle()
    body = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 450, "temperature": 0, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True},
                                headers={"X-Request-Id": "doomed-stream"}) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                first = [line async for line in _take(lines, 4)]
                plain = asyncio.create_task(c.post("/v1/completions", json=body,
                                                   headers={"X-Request-Id": "doomed-plain"}))
                stream_worker = await wait_until_held(service, "doomed-stream")
                plain_worker = await wait_until_held(service, "doomed-plain")
                # Least-loaded routing put the second request on the idle worker.
                assert plain_worker != stream_worker
                stats = await asyncio.to_thread(service.worker_stats)
                for wid in (stream_worker, plain_worker):
                    ray.kill(ray.get_actor(stats[wid]["actor_name"], namespace="serve"), no_restart=True)
                rest = await asyncio.wait_for(_collect(lines), 30)
            plain_response = await asyncio.wait_for(plain, 30)
        return first, rest, plain_response, {stream_worker, plain_worker}

    first, rest, plain_response, dead = asyncio.run(go())
    assert any(line.startswith("data: {") for line in first)

    # The stream ends with an SSE error event naming a retryable failure, then [DONE].
    events = [line[len("data: "):] for line in rest if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError" and "retry" in error["message"]

    # The non-streaming request gets an HTTP 503 with Retry-After.
    assert plain_response.status_code == 503, plain_response.text
    assert plain_response.json()["error"]["code"] == 503
    assert int(plain_response.headers["retry-after"]) >= 1

    # Serve replaces both replicas; they register with the scheduler, which has dropped the dead ones.
    fresh = service.wait_for_workers(NUM_WORKERS, timeout_s=120, exclude=dead)
    assert not fresh & dead
    for _ in range(100):
        if not set(service.scheduler_snapshot()["workers"]) & dead:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert not set(service.scheduler_snapshot()["workers"]) & dead
    assert not set(service.scheduler_snapshot()["routable"]) & dead

    # And the service answers again.
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        for _ in range(4):
            r = c.post("/v1/completions", json={**body, "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
    service.wait_idle()


async def _take(lines, n: int):
    for _ in range(n):
        yield await lines.__anext__()


async def _collect(lines) -> list[str]:
    return [line async for line in lines]


# ---------------------------------------------------------------------- steps that raise or hang
@pytest.fixture(scope="module")
def faulty(service):
    engine = service.engine.model_dump(mode="json")
    quarter = {"num_cpus": 0.25}
    with side_app(service, FAULTS_APP, "/faults", engine, workers=1, fault_injection=True, queue_timeout_s=1.5,
                  worker_health={"stall_timeout_s": 2.0, "max_failed_steps": 2},
                  worker={"ray_actor_options": quarter, "num_replicas": 1, "health_check_period_s": 1,
                          "graceful_shutdown_timeout_s": 2}) as svc:
        yield svc


def inject(svc, mode: str | None, replica: str) -> None:
    from ray import serve

    serve.get_deployment_handle("ModelWorker", app_name=svc.app).inject_fault.remote(
        mode, replica=replica).result(timeout_s=30)


def replaced(svc, sick: str) -> str:
    """The replica Serve started instead of ``sick``, once the scheduler routes to it and has forgotten ``sick``."""
    (fresh,) = svc.wait_for_workers(1, timeout_s=90, exclude={sick})
    deadline = time.monotonic() + 60
    while sick in svc.scheduler_snapshot()["workers"]:
        assert time.monotonic() < deadline, svc.scheduler_snapshot()
        time.sleep(0.2)
    return fresh


def assert_retryable(r: httpx.Response) -> None:
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    error = r.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503 and "retry" in error["message"]


def test_a_request_waiting_past_the_queue_timeout_gets_503_with_retry_after(faulty):
    """The one worker's 8 slots are taken by long streams; a ninth request waits in the global queue for
    queue_timeout_s (1.5 s here) and is refused with a retryable 503, leaving the queue."""
    faulty.wait_idle()

    async def hold(c, ready: asyncio.Event):
        async with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            ready.set()
            await asyncio.Event().wait()  # until cancelled

    async def go():
        async with httpx.AsyncClient(base_url=faulty.base_url, timeout=60) as c:
            readies = [asyncio.Event() for _ in range(8)]
            holders = [asyncio.create_task(hold(c, e)) for e in readies]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
            t0 = time.monotonic()
            r = await c.post("/v1/completions", json=SHORT)
            waited = time.monotonic() - t0
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return r, waited

    r, waited = asyncio.run(go())
    assert_retryable(r)
    assert "queue_timeout_s" in r.json()["error"]["message"] and 1.5 <= waited < 4
    snap = faulty.scheduler_snapshot()
    assert snap["counters"]["rejected_queue_timeout"] == 1 and snap["num_waiting"] == 0
    faulty.wait_idle()


def test_a_worker_whose_steps_raise_fails_its_requests_retryably_and_is_replaced(faulty):
    faulty.wait_idle()
    (sick,) = faulty.wait_for_workers(1)
    with httpx.Client(base_url=faulty.base_url, timeout=60) as c:
        assert c.post("/v1/completions", json=SHORT).status_code == 200
        inject(faulty, "raise", sick)
        for _ in range(2):  # max_failed_steps: each failed step fails its requests with a retryable 503
            r = c.post("/v1/completions", json=SHORT)
            assert_retryable(r)
            assert "failed a step" in r.json()["error"]["message"]
        # Unhealthy now: it reports so, refuses work, and fails its health check until Serve replaces it.
        deadline = time.monotonic() + 10
        while faulty.scheduler_snapshot()["workers"].get(sick, {}).get("stats", {}).get("unhealthy") is None:
            assert time.monotonic() < deadline, faulty.scheduler_snapshot()
            time.sleep(0.1)
        fresh = replaced(faulty, sick)
        r = c.post("/v1/completions", json=SHORT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    assert fresh != sick
    faulty.wait_idle()


def test_a_worker_whose_step_hangs_fails_its_stream_retryably_and_is_replaced(faulty):
    """A step that never returns (a hung kernel): after stall_timeout_s (2 s here) the worker ends the stream
    with a retryable SSE error event and [DONE], and Serve replaces the replica."""
    faulty.wait_idle()
    (stuck,) = faulty.wait_for_workers(1)
    with httpx.Client(base_url=faulty.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            inject(faulty, "hang", stuck)
            t0 = time.monotonic()
            events = parse_sse(list(lines))
            ended = time.monotonic() - t0
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 503 and "no engine step completed" in error["message"] and "retry" in error["message"]
        assert ended < 2.0 + 3, ended  # the stall limit, a heartbeat tick, and the hops
        replaced(faulty, stuck)
        r = c.post("/v1/completions", json=SHORT)
        assert r.status_code == 200, r.text
    faulty.wait_idle()
