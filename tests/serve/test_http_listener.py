"""The ingress replicas' own HTTP server (actors/http_listener.py), without Ray: port sharing, request ids, the
wait for the replica to be ready, and a shutdown that lets a stream in flight finish."""

import asyncio
import socket

import httpx
import pytest

from gpt2serve.actors.http_listener import HTTPListener, bind_shared_port
from tests.conftest import free_port


def test_two_processes_worth_of_sockets_share_one_port():
    port = free_port()
    a, b = bind_shared_port("127.0.0.1", port), bind_shared_port("127.0.0.1", port)
    try:
        assert a.getsockname()[1] == b.getsockname()[1] == port
        # A plain socket (a process that did not opt in) cannot take the port from them.
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()
    finally:
        a.close()
        b.close()


async def _stream_app(scope, receive, send):
    """Echoes the request id it sees, then streams three chunks slowly (a stream in flight at shutdown)."""
    assert scope["type"] == "http"
    rid = dict(scope["headers"])[b"x-request-id"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for i in range(3):
        await send({"type": "http.response.body", "body": rid + b" %d\n" % i, "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_request_ids_are_kept_or_made_and_echoed():
    async def scenario():
        port = free_port()
        listener = HTTPListener(_stream_app, "127.0.0.1", port, ready=lambda: True)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                for _ in range(50):  # until uvicorn accepts
                    try:
                        given = await c.get("/", headers={"X-Request-Id": "mine-1"})
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.05)
                made = await c.get("/")
        finally:
            await listener.close()
        return given, made

    given, made = asyncio.run(scenario())
    assert given.headers["x-request-id"] == "mine-1" and given.text.startswith("mine-1 0")
    rid = made.headers["x-request-id"]
    assert len(rid) == 32 and made.text.splitlines() == [f"{rid} {i}" for i in range(3)]


def test_nothing_is_served_before_the_replica_is_ready_and_a_stream_in_flight_finishes_at_shutdown():
    async def scenario():
        port = free_port()
        ready = asyncio.Event()
        listener = HTTPListener(_stream_app, "127.0.0.1", port, ready=ready.is_set, graceful_s=5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            early = asyncio.ensure_future(c.get("/"))
            await asyncio.sleep(0.3)
            waited = not early.done()  # connected (the socket listens) but not answered yet
            ready.set()
            first = await early
            async with c.stream("GET", "/") as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if len(lines) == 1:  # mid-stream: shut down
                        closing = asyncio.ensure_future(listener.close())
            await closing
        refused = False
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                await c.get(f"http://127.0.0.1:{port}/")
        except httpx.HTTPError:
            refused = True
        return waited, first, lines, refused

    waited, first, lines, refused = asyncio.run(scenario())
    assert waited and first.status_code == 200
    assert len(lines) == 3  # the stream in flight ran to its end
    assert refused  # and the port is closed afterwards
