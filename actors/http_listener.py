"""The ingress replicas' own HTTP server: the OpenAI API served from inside each ingress replica, on one port that
every ingress replica of a node shares, with no proxy in between.

Behind Serve's HTTP proxy, every SSE event of every stream is one more item of a Ray streaming call from the
ingress replica to the proxy (Serve turns each ASGI message into one), and one proxy process per node receives,
unpickles and writes all of them. At 100 streams of ~80 tokens/s that one process is the ceiling of the service
(``benchmarks/profile_service.py`` measures it; docs/serving-path.md has the figures). Serving HTTP from the
ingress replicas themselves removes that hop: each replica parses its own requests and writes its own SSE, so
the work spreads over the replicas and no token crosses a process boundary between the worker's channel and the
client's socket.

How: every ingress replica binds the configured port with ``SO_REUSEPORT``, and the kernel spreads incoming
connections over the replicas listening on it. Replicas added or removed by Serve join or leave the port by
themselves. The server is uvicorn, as in Serve's own proxy and direct ingress; Serve's direct ingress does the same
on one port per replica and needs ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` (or HAProxy in front, with
``RAY_SERVE_ENABLE_HA_PROXY``) set in the environment before the cluster starts, which a config file cannot do.
Turned on by the application's ``http_listener:`` setting (``actors/settings.py``), with ``proxy_location:
Disabled`` so that no proxy holds the port.

What the proxy did that this does too: an ``X-Request-Id`` on every response (the client's, or a new one, which
the handlers read too), and a client that disconnects cancels its request (Starlette notices the disconnect and the
ingress closes the request's streams, as behind the proxy). On shutdown the socket closes first (the kernel then
sends new connections to the other replicas) and requests in flight get ``graceful_s`` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from typing import Any, Callable

import uvicorn

log = logging.getLogger("ray.serve")
REQUEST_ID = b"x-request-id"


def bind_shared_port(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket that other processes of this user can bind too (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _ReplicaServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the replica's signals belong to Ray, which stops the replica through Serve


def with_request_id(app: Callable) -> Callable:
    """ASGI wrapper: every HTTP request carries an ``X-Request-Id`` (the client's, else a new one) and its
    response echoes it, as Serve's proxy does."""

    async def wrapped(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k == REQUEST_ID), None)
        if rid is None:
            rid = uuid.uuid4().hex.encode()
            scope = {**scope, "headers": [*scope["headers"], (REQUEST_ID, rid)]}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID, rid)]}
            await send(message)

        await app(scope, receive, send_with_id)

    return wrapped


class HTTPListener:
    """Serves ``app`` on ``host:port`` from this process once ``ready()`` is true; ``close()`` stops it."""

    def __init__(self, app: Callable, host: str, port: int, ready: Callable[[], bool], graceful_s: float = 30.0):
        self.sock = bind_shared_port(host, port)  # here, so that a port that cannot be shared fails the replica
        self.address = f"{host}:{port}"
        config = uvicorn.Config(with_request_id(app), lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=graceful_s, timeout_keep_alive=30)
        self.server = _ReplicaServer(config)
        self.task = asyncio.get_running_loop().create_task(self._serve(ready))

    async def _serve(self, ready: Callable[[], bool]) -> None:
        # Connections wait in the socket's backlog until the replica's handlers can take them.
        while not ready():
            if self.server.should_exit:
                return
            await asyncio.sleep(0.05)
        log.info("serving HTTP on %s (shared with the other ingress replicas)", self.address)
        await self.server.serve(sockets=[self.sock])

    async def close(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.server.config.timeout_graceful_shutdown + 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.task.cancel()
        finally:
            self.sock.close()
