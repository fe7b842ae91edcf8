"""Prefix-aware routing end to end: the same trace through two applications of 2 workers each, one routing with
``prefix_aware`` and one with ``least_loaded``, measured by the workers' own prefix-cache counters.

The trace: 4 prompt prefixes of 12 KV blocks (192 tokens) each, every request one of them plus 8 tokens of its
own, 8 tokens out. The first request of each prefix goes in the first wave (4 at once); then 11 waves of 4
concurrent requests, one per prefix in a shuffled order (48 requests in all), each wave after the previous one
finished and was released at the scheduler, so that a prefix's blocks are cached before the next request for it
arrives, and every wave is routed against the same reservations.

Each worker's pool is 32 blocks: room for two prefixes (24 blocks) and the two requests the scheduler lets it run
at once (13 blocks reserved each), but not for all four. Routing by prefix, each worker keeps the two prefixes it
got first and every later request finds its whole prefix cached. Routing by load, each worker sees all four
prefixes and evicts one to make room for another, so about half the requests compute their prefix again. This is
the case prefix-aware routing is for: the cache of the whole service holds as much as the sum of its replicas',
instead of each replica caching the same hot prefixes.
"""

import asyncio
import random
import time

import httpx
import pytest

from tests.serve.conftest import CHANNEL_IDLE_S, MODEL_NAME, Service

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

NUM_PREFIXES, PREFIX_BLOCKS, OWN_TOKENS, MAX_TOKENS, FOLLOWER_WAVES = 4, 12, 8, 8, 11
BLOCK = 16
POOL_BLOCKS = 32
APPS = {"prefix_aware": ("gpt2-prefix-aware", "/prefix-aware"), "least_loaded": ("gpt2-least-loaded", "/least-loaded")}


def trace(seed: int = 7) -> list[list[list[int]]]:
    """Waves of prompts (token ids): the first of each prefix together, then one per prefix per wave."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(500) for _ in range(PREFIX_BLOCKS * BLOCK)] for _ in range(NUM_PREFIXES)]

    def prompt(p: int) -> list[int]:
        return prefixes[p] + [rng.randrange(500) for _ in range(OWN_TOKENS)]

    waves = [[prompt(p) for p in range(NUM_PREFIXES)]]
    for _ in range(FOLLOWER_WAVES):
        order = list(range(NUM_PREFIXES))
        rng.shuffle(order)
        waves.append([prompt(p) for p in order])
    return waves


@pytest.fixture(scope="module")
def apps(service):
    """Both applications, deployed side by side in the session's Serve instance; deleted afterwards."""
    from ray import serve

    from gpt2serve import serve_app

    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    engine = service.engine.model_copy(update={"num_gpu_blocks": POOL_BLOCKS}).model_dump(mode="json")
    deployed = {}
    try:
        for policy, (name, prefix) in APPS.items():
            serve.run(serve_app.build_app({
                "engine": engine, "served_model_name": MODEL_NAME, "routing_policy": policy,
                "heartbeat_interval_s": 0.2, "channel_idle_s": CHANNEL_IDLE_S, "ingress": quarter, "scheduler": quarter,
                "worker": {**quarter, "num_replicas": 2},
            }), name=name, route_prefix=prefix)
            deployed[policy] = Service(service.proxy_url + prefix, service.proxy_url, service.engine, app=name)
        for app in deployed.values():
            app.wait_for_workers(2)
        yield deployed
    finally:  # both at once: a worker's drain waits for its idle channels to close
        for name, _ in APPS.values():
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + 60
        while {name for name, _ in APPS.values()} & set(serve.status().applications):
            assert time.monotonic() < deadline, "the test applications were not deleted"
            time.sleep(0.2)


async def send(client: httpx.AsyncClient, prompt: list[int]) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                   "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def run_trace(app: Service) -> dict:
    """Send the trace wave by wave; the workers' prefix-cache counters over it, and the router's decisions."""
    before = app.wait_idle()

    def released() -> None:  # releases are fire-and-forget from the ingress: they may trail the responses
        deadline = time.monotonic() + 10
        while app.scheduler_snapshot()["num_assigned"]:
            assert time.monotonic() < deadline, app.scheduler_snapshot()
            time.sleep(0.01)

    async def go():
        async with httpx.AsyncClient(base_url=app.base_url, timeout=60) as client:
            for wave in trace():
                await asyncio.gather(*(send(client, prompt) for prompt in wave))
                await asyncio.to_thread(released)

    started = time.monotonic()
    asyncio.run(go())
    elapsed = time.monotonic() - started
    after = app.wait_idle()  # also: every block of every pool is free again (cached ones included)
    assert set(after) == set(before) and len(after) == 2
    # The router's view of each worker's cache (from its heartbeat events) agrees with the engine's own count.
    deadline = time.monotonic() + 10
    while True:
        known = {w: s["cached_blocks"] for w, s in app.scheduler_snapshot()["workers"].items()}
        held = {w: s["num_cached_blocks"] for w, s in app.worker_stats().items()}
        if known == held:
            break
        assert time.monotonic() < deadline, (known, held)
        time.sleep(0.1)

    def delta(key: str) -> int:
        return sum(after[w][key] - before[w].get(key, 0) for w in after)

    queries, hits = delta("prefix_cache_queries"), delta("prefix_cache_hits")
    return {"queries": queries, "hits": hits, "computed": queries - hits, "elapsed_s": elapsed,
            "decisions": app.scheduler_snapshot()["routing"]["decisions"], "stats": after}


def test_prefix_aware_routing_reuses_the_cache_and_halves_prefill(apps):
    aware, loaded = run_trace(apps["prefix_aware"]), run_trace(apps["least_loaded"])
    requests = NUM_PREFIXES * (1 + FOLLOWER_WAVES)
    followers = NUM_PREFIXES * FOLLOWER_WAVES
    prompt_tokens = PREFIX_BLOCKS * BLOCK + OWN_TOKENS
    for result in (aware, loaded):
        # Every prompt was looked up once (no preemption: the scheduler reserved every request's blocks).
        assert result["queries"] == requests * prompt_tokens, result
        assert sum(result["decisions"].values()) == requests
        for stats in result["stats"].values():
            assert stats["num_free_blocks"] == stats["num_total_blocks"] == POOL_BLOCKS
            assert not stats["active_request_ids"]

    # A follower on the replica holding its prefix finds all 12 blocks; the first of each prefix finds nothing.
    share = aware["hits"] / (followers * PREFIX_BLOCKS * BLOCK)
    assert share >= 0.9, aware
    assert aware["decisions"]["prefix_match"] >= 0.9 * followers, aware["decisions"]
    assert loaded["decisions"] == {"prefix_match": 0, "load_fallback": 0, "load": requests}
    reduction = 1 - aware["computed"] / loaded["computed"]
    assert reduction >= 0.5, (aware, loaded)
    print(f"\nprefix_aware: {share:.1%} of follower prefix tokens hit; prefill tokens computed "
          f"{aware['computed']} vs {loaded['computed']} with least_loaded ({reduction:.1%} fewer); "
          f"decisions {aware['decisions']}; trace {aware['elapsed_s']:.1f} s vs {loaded['elapsed_s']:.1f} s")
