"""A model worker that dies mid-request: its requests end at once with a retryable error, and Serve replaces it.

Runs last (file order): it kills the session's workers.
"""

import asyncio
import json

import httpx
import pytest
import ray

from tests.serve.conftest import MODEL_NAME, NUM_WORKERS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


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
