"""Who may call the API, and from which web pages: API keys and CORS, checked before any route runs.

``Access`` is one ingress replica's policy, from its ``ServiceConfig``: the keys a client must present as
``Authorization: Bearer <key>`` (compared in constant time, so that timing does not tell how much of a guess
was right), and the origins whose pages may read answers (CORS; none by default). ``/health`` stays open for
load balancers and probes, and so do the playground's static files, which hold no data: a browser cannot send a
key when it navigates to a page, so the page asks for the key and sends it on every call it makes.

``Gate`` is the ASGI middleware that applies it. The FastAPI app is built at import, before any replica has its
settings, so the gate asks for the replica's ``Access`` when a request comes (``policy()``; None until the
replica is up, when no route can answer anyway).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Callable

from gpt2serve.actors.openai_api import APIError

log = logging.getLogger("ray.serve")
OPEN_PATHS = frozenset({"/health", "/playground", "/playground/", "/playground/index.html",
                        "/playground/playground.js", "/playground/playground.css"})
LOOPBACK = ("127.", "::1", "localhost")


class Access:
    def __init__(self, api_keys: list[str], cors_origins: list[str]):
        self.keys = [k.encode() for k in api_keys]
        self.any_origin = "*" in cors_origins
        self.origins = {o.rstrip("/") for o in cors_origins}

    @property
    def open(self) -> bool:
        return not self.keys

    def key_ok(self, authorization: bytes | None) -> bool:
        scheme, _, given = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            given = b""
        ok = False
        for key in self.keys:  # every key, always: the time taken does not depend on which one matched
            ok |= hmac.compare_digest(given.strip(), key)
        return ok

    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/") in self.origins


def warn_if_open(access: Access, host: str | None) -> None:
    if access.open and host is not None and not host.startswith(LOOPBACK):
        log.warning("no API key is configured and the API listens on %s: anyone who can reach it may use it "
                    "(set api_keys or GPT2SERVE_API_KEY)", host)


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


def _route_path(scope: dict[str, Any]) -> str:
    """The path below the application's route prefix (Serve's proxy mounts applications by prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class Gate:
    def __init__(self, app: Callable, policy: Callable[[], Access | None]):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        access = self.policy() if scope["type"] == "http" else None
        if access is None:
            return await self.app(scope, receive, send)
        raw_origin = _header(scope, b"origin")
        origin = raw_origin.decode("latin-1") if raw_origin else None
        cors = [(b"access-control-allow-origin", raw_origin), (b"vary", b"Origin")] if (
            origin and access.origin_allowed(origin)) else []
        if scope["method"] == "OPTIONS" and origin and _header(scope, b"access-control-request-method"):
            # A browser's preflight: it carries no credentials, so it is answered here, before the key check.
            if not cors:
                return await _send_error(send, APIError(403, f"origin {origin} may not call this API "
                                                             "(cors_allowed_origins)"), [])
            return await _send(send, 204, b"", cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type, x-request-id"),
                (b"access-control-max-age", b"600")])
        if not access.open and _route_path(scope) not in OPEN_PATHS and not access.key_ok(
                _header(scope, b"authorization")):
            return await _send_error(send, APIError(
                401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'.",
                type_="invalid_request_error", code="invalid_api_key"),
                cors + [(b"www-authenticate", b"Bearer")])
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _send_error(send: Callable, error: APIError, headers: list[tuple[bytes, bytes]]) -> None:
    await _send(send, error.status, json.dumps(error.body()).encode(),
                headers + [(b"content-type", b"application/json")])


async def _send(send: Callable, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
