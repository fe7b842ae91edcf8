"""Two ingress replicas on one port (actors/http_listener.py) through Ray Serve: the kernel spreads connections
over both, and each serves the API by itself. Which replica answered shows in its own request counter: `/metrics`
carries the answering replica's `gpt2serve:requests_total`."""

import re

import httpx
import pytest

from tests.conftest import free_port
from tests.serve.conftest import CHANNEL_IDLE_S, MODEL_NAME

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]
REQUESTS = 25  # odd: the two replicas' counts differ, so each shows as its own value below


def _answered(text: str) -> int:
    return int(sum(float(v) for v in re.findall(r'^gpt2serve:requests_total\{status="200"\} (\S+)$', text, re.M)))


def test_two_ingress_replicas_share_the_port_and_both_serve(service):
    from ray import serve

    from gpt2serve import serve_app

    port = free_port()
    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    name = "gpt2-two-ingresses"
    serve.run(serve_app.build_app({
        "engine": service.engine.model_dump(mode="json"), "served_model_name": MODEL_NAME,
        "heartbeat_interval_s": 0.2, "channel_idle_s": CHANNEL_IDLE_S,
        "http_listener": {"host": "127.0.0.1", "port": port},
        "ingress": {**quarter, "num_replicas": 2}, "scheduler": quarter, "worker": quarter}),
        name=name, route_prefix="/two-ingresses")
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 2}
        for _ in range(REQUESTS):  # a new connection each: the kernel picks a replica per connection
            with httpx.Client(base_url=url, timeout=60) as c:
                assert c.post("/v1/completions", json=body).status_code == 200
        seen = set()
        for _ in range(40):
            with httpx.Client(base_url=url, timeout=60) as c:
                seen.add(_answered(c.get("/metrics").text))
            if len(seen) == 2:
                break
        # Two replicas, each with its own count; both answered some, together every request.
        assert len(seen) == 2 and min(seen) > 0 and sum(seen) == REQUESTS, seen
    finally:
        serve.delete(name)
