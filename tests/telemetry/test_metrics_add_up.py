"""Metrics that add up, through the whole service: after a known set of requests the counters and histograms on
/metrics (and on Ray's metrics endpoint) agree with what the clients received, and cost = GPU-seconds x price."""

import asyncio
import time

import httpx
import pytest

from tests.telemetry.conftest import PRICE_PER_GPU_HOUR, by_replica, scrape, total, wait_for, wait_idle

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

HISTOGRAMS = ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_cost_dollars")


def known_requests(model: str) -> list[tuple[str, dict]]:
    """Streaming and plain completions, chat, and one request with two samples; all ignore EOS."""
    reqs = []
    for i in range(10):
        prompt = [(7 * i + j) % 500 for j in range(5 + 4 * i)]
        body = {"model": model, "prompt": prompt, "max_tokens": 6 + 3 * i, "ignore_eos": True, "temperature": 0}
        if i % 2 == 0:
            body.update(stream=True, stream_options={"include_usage": True})
        reqs.append(("/v1/completions", body))
    reqs.append(("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hello there"}],
                                          "max_tokens": 9, "ignore_eos": True}))
    reqs.append(("/v1/completions", {"model": model, "prompt": [3, 1, 4, 1, 5], "max_tokens": 7, "n": 2,
                                     "ignore_eos": True, "temperature": 1.0, "seed": 1}))
    return reqs


async def send(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """The response's usage (read from the last event of a stream)."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    usage = None
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                import json

                usage = json.loads(line[len("data: "):])["usage"]
    assert usage is not None
    return usage


def test_counters_and_histograms_match_what_clients_received(stack):
    before = wait_idle(stack.url)
    t0 = time.monotonic()
    reqs = known_requests(stack.model)

    async def run():
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            return await asyncio.gather(*(send(client, path, body) for path, body in reqs))

    usages = asyncio.run(run())
    after = wait_idle(stack.url)
    elapsed = time.monotonic() - t0

    def delta(name, **labels):
        return total(after, f"gpt2serve:{name}", **labels) - total(before, f"gpt2serve:{name}", **labels)

    n = len(reqs)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert completion_tokens == sum(b["max_tokens"] * b.get("n", 1) for _, b in reqs)  # ignore_eos: exact
    assert delta("generation_tokens_total") == completion_tokens
    assert delta("prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("http_generation_tokens_total") == completion_tokens  # the ingress's count agrees
    for name in HISTOGRAMS:
        assert delta(f"{name}_count") == n, name
    assert delta("request_success_total", finished_reason="length") == n
    assert delta("request_success_total") == n
    assert delta("request_aborted_total") == 0
    assert delta("step_time_seconds_count") > 0
    # One routing decision per admission (a prompt re-admitted after its worker refused it counts again).
    assert delta("router_decisions_total") == delta("scheduler_admitted") >= n
    assert 0 <= delta("prefix_cache_hits_total") <= delta("prefix_cache_queries_total")
    assert delta("prefix_cache_queries_total") >= delta("prompt_tokens_total")  # a preempted prompt is looked up again

    # Cost: each replica's dollars are its GPU-seconds at the price, and GPU-seconds follow wall time (1 GPU).
    gpu_s, dollars = by_replica(after, "gpt2serve:gpu_seconds_total"), by_replica(after, "gpt2serve:cost_dollars_total")
    assert len(gpu_s) == stack.workers and set(dollars) == set(gpu_s)
    for replica, seconds in gpu_s.items():
        assert dollars[replica] == pytest.approx(seconds * PRICE_PER_GPU_HOUR / 3600, rel=1e-9)
        accrued = seconds - by_replica(before, "gpt2serve:gpu_seconds_total")[replica]
        assert elapsed - 1.0 < accrued < elapsed + 1.0, (replica, accrued, elapsed)
    # The requests' attributed costs are their share of busy time: never more than what was spent.
    assert 0 < delta("request_cost_dollars_sum") <= delta("cost_dollars_total")


def test_prefix_cache_counters_add_up(stack, prefix_reuse):
    """Requests sharing a prefix, one after another: every prompt token is looked up once, and every request after
    the first finds the whole prefix cached, on the replica the router sent the first one to."""
    before, after = prefix_reuse.before, prefix_reuse.after

    def delta(name, **labels):
        return total(after, f"gpt2serve:{name}", **labels) - total(before, f"gpt2serve:{name}", **labels)

    assert delta("prefix_cache_queries_total") == prefix_reuse.prompt_tokens
    assert delta("prefix_cache_hits_total") == (prefix_reuse.requests - 1) * prefix_reuse.shared_tokens
    hits = {r: v - by_replica(before, "gpt2serve:prefix_cache_hits_total").get(r, 0)
            for r, v in by_replica(after, "gpt2serve:prefix_cache_hits_total").items()}
    assert sorted(hits.values())[-1] == delta("prefix_cache_hits_total")  # all on one replica
    assert delta("router_decisions_total", reason="prefix_match") == prefix_reuse.requests - 1
    assert delta("router_decisions_total") == delta("scheduler_admitted") >= prefix_reuse.requests


def test_ray_metrics_endpoint_agrees(stack):
    """The same counters reach Ray's metrics endpoint (ray_gpt2serve_*), a report interval later."""
    samples = wait_idle(stack.url)
    expected = {name: total(samples, f"gpt2serve:{name}") for name in (
        "generation_tokens_total", "prompt_tokens_total", "time_to_first_token_seconds_count",
        "e2e_request_latency_seconds_count", "request_success_total", "request_rejected_total",
        "prefix_cache_queries_total", "router_decisions_total")}

    def agree():
        ray = scrape(stack.ray_metrics_url)
        got = {name: total(ray, f"ray_gpt2serve_{name}") for name in expected}
        return got if got == expected else None

    wait_for(agree, 20, f"Ray's endpoint to show {expected}")


def test_metrics_page_is_one_valid_exposition(stack):
    """No metric family twice (Prometheus rejects a page with a repeated TYPE line); the engine metrics come from
    every worker, labelled by replica."""
    import urllib.request

    text = urllib.request.urlopen(f"{stack.url}/metrics").read().decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    replicas = by_replica(scrape(f"{stack.url}/metrics"), "gpt2serve:num_gpus")
    assert len(replicas) == stack.workers and all(v == 1 for v in replicas.values())
