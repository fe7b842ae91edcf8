"""The API's door without Ray (actors/gate.py): API keys, open paths, CORS preflight and headers; and the
directories runtime LoRA loading may read (lora_registry.allowed_adapter_dir)."""

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gpt2serve.actors.gate import Access, Gate
from gpt2serve.actors.lora_registry import allowed_adapter_dir
from gpt2serve.actors.settings import ServiceConfig
from gpt2serve.engine.lora import LoRAError


def gated(access: Access | None) -> TestClient:
    app = FastAPI()
    for path in ("/health", "/v1/models", "/playground/playground.js"):
        app.add_api_route(path, lambda: {"ok": True})
    app.add_api_route("/v1/completions", lambda: {"ok": True}, methods=["POST"])
    app.add_middleware(Gate, policy=lambda: access)
    return TestClient(app)


def test_keys_guard_every_route_but_health_and_the_playground_files():
    client = gated(Access(["k1", "k2"], []))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}
    assert client.post("/v1/completions", json={}).status_code == 401
    for key in ("k1", "k2"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/playground/playground.js").status_code == 200
    assert gated(Access([], [])).get("/v1/models").status_code == 200  # no key configured: open
    assert gated(None).get("/v1/models").status_code == 200  # replica not up yet: the routes decide


def test_cors_is_closed_by_default_and_opens_per_origin():
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    closed = gated(Access([], []))
    assert closed.options("/v1/completions", headers=preflight).status_code == 403
    r = closed.get("/v1/models", headers={"Origin": "https://a.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    client = gated(Access(["k"], ["https://a.example"]))
    r = client.options("/v1/completions", headers=preflight)  # no key on a preflight: browsers send none
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://a.example"
    assert "authorization" in r.headers["access-control-allow-headers"]
    r = client.get("/v1/models", headers={"Origin": "https://a.example", "Authorization": "Bearer k"})
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    r = client.get("/v1/models", headers={"Origin": "https://a.example"})  # a 401 the page can read
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://a.example"
    assert "access-control-allow-origin" not in client.get(
        "/v1/models", headers={"Origin": "https://b.example", "Authorization": "Bearer k"}).headers
    assert gated(Access([], ["*"])).options("/v1/completions", headers=preflight).status_code == 204


def test_keys_from_the_environment_and_lora_loading_needs_roots():
    cfg = ServiceConfig.from_args({"api_keys": ["key-a"]}, env={"GPT2SERVE_API_KEY": "key-b,key-c"})
    assert cfg.api_keys == ["key-a", "key-b", "key-c"] and "key-b" not in repr(cfg)
    assert not ServiceConfig().allow_runtime_lora_updating and ServiceConfig().cors_allowed_origins == []
    with pytest.raises(ValueError, match="lora_allowed_roots"):
        ServiceConfig.from_args({"enable_lora": True}, env={"GPT2SERVE_ALLOW_RUNTIME_LORA_UPDATING": "true"})
    cfg = ServiceConfig.from_args({"enable_lora": True, "lora_allowed_roots": ["/adapters"]},
                                  env={"GPT2SERVE_ALLOW_RUNTIME_LORA_UPDATING": "true"})
    assert cfg.allow_runtime_lora_updating


def test_adapter_paths_outside_the_roots_get_the_same_message_as_missing_ones(tmp_path: Path):
    root, outside = tmp_path / "adapters", tmp_path / "secret"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    roots = [root.resolve()]
    assert allowed_adapter_dir(str(root / "a"), roots) == str((root / "a").resolve())
    assert allowed_adapter_dir(str(root / "a" / ".." / "a"), roots) == str((root / "a").resolve())
    messages = set()
    for path in (outside, root / "link", root / "missing", root / "a" / ".." / ".." / "secret", "/etc", "a\0b"):
        with pytest.raises(LoRAError) as e:
            allowed_adapter_dir(str(path), roots)
        messages.add(str(e.value).replace(repr(str(path)), "<path>"))
    assert len(messages) == 1, messages
