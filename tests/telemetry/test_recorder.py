"""The metrics recorder on the real engine (tiny model, CPU), without Ray: metrics that add up."""

import asyncio

import pytest
from prometheus_client import generate_latest

from gpt2serve import AsyncLLM, SamplingParams
from gpt2serve.engine.metrics import (PREFIX, WORKER_METRICS, Cost, CostConfig, PrometheusBackend, ServingMetrics,
                                      StepInfo, merge_families, observe_steps)

LABELS = {"model_name": "tiny", "replica": "r0"}


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def value(backend, name, **labels):
    return backend.registry.get_sample_value(PREFIX + name, {**LABELS, **labels}) or 0.0


def make(make_engine, cost=Cost(num_gpus=2, price_per_gpu_hour=7.2, node_type="test"), clock=None, **overrides):
    engine = make_engine(**overrides)
    backend = PrometheusBackend()
    rec = ServingMetrics(backend, "tiny", "r0", cost, **({"clock": clock} if clock else {}))
    observe_steps(engine, rec.on_step)
    return engine, backend, rec


async def stream(llm, rec, rid, prompt, params):
    rec.request_started(rid)
    tokens = 0
    try:
        async for out in llm.generate(prompt, params, request_id=rid):
            rec.on_output(out)
            tokens += sum(len(c.token_ids) for c in out.outputs)
    finally:
        rec.request_ended(rid)
    return tokens


def test_counters_and_histograms_add_up(make_engine):
    clock = FakeClock()
    engine, backend, rec = make(make_engine, clock=clock)
    llm = AsyncLLM(engine)
    lengths = [(5 + 7 * i, 3 + 5 * i) for i in range(9)]  # (prompt tokens, max_tokens)

    async def run():
        return await asyncio.gather(*(
            stream(llm, rec, f"r{i}", list(range(1, p + 1)), SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(lengths)))

    returned = asyncio.run(run())
    clock.t += 10.0
    rec.tick(engine.stats(), gpu_memory_used_bytes=0)

    assert returned == [m for _, m in lengths]
    assert value(backend, "generation_tokens_total") == sum(returned)
    assert value(backend, "prompt_tokens_total") == sum(p for p, _ in lengths)
    n = len(lengths)
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_cost_dollars"):
        assert value(backend, name + "_count") == n, name
    assert value(backend, "request_success_total", finished_reason="length") == n
    assert value(backend, "request_aborted_total") == 0
    steps = engine.runner.timing["steps"]
    stepped = sum(value(backend, "step_time_seconds_count", phase=p) for p in ("prefill", "decode"))
    assert stepped == steps and value(backend, "step_time_seconds_count", phase="decode") > 0
    # Cost: 10 s of wall time on 2 GPUs at $7.20 per GPU-hour is 20 GPU-seconds and 4 cents, exactly.
    assert value(backend, "gpu_seconds_total") == pytest.approx(20.0)
    assert value(backend, "cost_dollars_total") == pytest.approx(value(backend, "gpu_seconds_total") * 7.2 / 3600)
    busy = sum(value(backend, "step_time_seconds_sum", phase=p) for p in ("prefill", "decode"))
    assert value(backend, "gpu_busy_seconds_total") == pytest.approx(2 * busy)
    # Every step's GPU time is handed out to the requests in it, so the requests' costs add up to the busy cost.
    assert value(backend, "request_cost_dollars_sum") == pytest.approx(2 * busy * 7.2 / 3600, rel=1e-6)
    assert value(backend, "num_gpus") == 2
    assert value(backend, "gpu_price_dollars_per_hour", node_type="test") == 7.2
    assert value(backend, "num_requests_running") == 0 and value(backend, "kv_cache_usage_perc") == 0
    assert rec.num_tracked() == 0


def test_longer_requests_cost_more(make_engine):
    engine, backend, rec = make(make_engine)
    llm = AsyncLLM(engine)
    costs = []

    async def run():
        for i, max_tokens in enumerate((4, 4, 40)):  # the first one warms up
            before = value(backend, "request_cost_dollars_sum")
            await stream(llm, rec, f"c{i}", [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            costs.append(value(backend, "request_cost_dollars_sum") - before)

    asyncio.run(run())
    assert 0 < costs[1] < costs[2]


def test_abort_is_counted_once_and_forgotten(make_engine):
    engine, backend, rec = make(make_engine)
    llm = AsyncLLM(engine)

    async def run():
        task = asyncio.create_task(stream(llm, rec, "gone", [1, 2, 3], SamplingParams(max_tokens=400,
                                                                                      ignore_eos=True)))
        while value(backend, "step_time_seconds_count", phase="decode") < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream(llm, rec, "ok", [4, 5], SamplingParams(max_tokens=3, ignore_eos=True))

    asyncio.run(run())
    rec.tick(engine.stats())
    assert value(backend, "request_aborted_total") == 1
    assert value(backend, "request_success_total", finished_reason="length") == 1
    assert value(backend, "e2e_request_latency_seconds_count") == 1
    assert rec.num_tracked() == 0


def test_preemptions_and_swaps_follow_the_engine_counters(make_engine):
    # 12 blocks of 16 tokens cannot hold four 100-token sequences at once: the engine must preempt.
    engine, backend, rec = make(make_engine, num_gpu_blocks=12, preemption_policy="swap")
    llm = AsyncLLM(engine)

    async def run():
        await asyncio.gather(*(stream(llm, rec, f"p{i}", list(range(1, 30)), SamplingParams(
            max_tokens=70, ignore_eos=True)) for i in range(4)))

    asyncio.run(run())
    rec.tick(engine.stats())
    stats = engine.stats()
    assert stats["preemptions_swap"] > 0
    assert value(backend, "num_preemptions_total") == stats["preemptions_swap"] + stats.get("preemptions_recompute", 0)
    assert value(backend, "num_swap_out_total") == stats["swap_out"]
    assert value(backend, "num_swap_in_total") == stats["swap_in"]
    rec.tick(engine.stats())  # counters follow deltas: a second tick adds nothing
    assert value(backend, "num_swap_out_total") == stats["swap_out"]


def test_step_phases():
    backend = PrometheusBackend()
    rec = ServingMetrics(backend, "tiny", "r0")
    rec.on_step(StepInfo(0.5, {"a": 100, "b": 1}, num_prefill_tokens=100, num_decode_tokens=1))
    rec.on_step(StepInfo(0.25, {"b": 1}, num_prefill_tokens=0, num_decode_tokens=1))
    assert value(backend, "step_time_seconds_sum", phase="prefill") == 0.5
    assert value(backend, "step_time_seconds_sum", phase="decode") == 0.25


def test_cost_config_resolves_price_by_node_type():
    cfg = CostConfig(gpu_hour_prices={"H100": 3.0, "A10G": 1.0}, default_gpu_hour_price=0.5)
    assert cfg.resolve("NVIDIA H100 80GB HBM3", 1) == Cost(1.0, 3.0, "NVIDIA H100 80GB HBM3")
    assert cfg.resolve("NVIDIA L4", 1).price_per_gpu_hour == 0.5
    assert cfg.resolve(None, 0) == Cost(0.0, 0.5, "cpu")  # a CPU worker holds no GPU: it costs nothing
    forced = CostConfig(gpu_hour_prices={"cpu-box": 3.6}, node_type="cpu-box", num_gpus=1).resolve(None, 0)
    assert forced == Cost(1.0, 3.6, "cpu-box") and forced.dollars_per_gpu_second == pytest.approx(0.001)


def test_every_metric_is_exposed_with_its_labels():
    backend = PrometheusBackend()
    rec = ServingMetrics(backend, "tiny", "r0", Cost(1, 1.0, "x"))
    rec.tick({"num_running": 1, "num_waiting": 0, "num_swapped": 0, "kv_usage": 0.5, "preemptions_recompute": 1,
              "swap_out": 1, "swap_in": 1}, gpu_memory_used_bytes=123)
    text = generate_latest(backend.registry).decode()
    for spec in WORKER_METRICS.values():
        assert f"# TYPE {spec.series()} {spec.kind}" in text, spec.name
    assert "_created" not in text  # the creation-time series are switched off: they only add noise


def test_families_from_two_replicas_merge_into_one_exposition():
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    backends = []
    for replica in ("a", "b"):
        b = PrometheusBackend()
        ServingMetrics(b, "tiny", replica).tick({"num_running": 3})
        backends.append(b)

    class Merged:
        def collect(self):
            return merge_families(b.families() for b in backends)

    reg = CollectorRegistry()
    reg.register(Merged())
    text = generate_latest(reg).decode()
    assert text.count("# TYPE gpt2serve:num_requests_running gauge") == 1
    fam = {f.name: f for f in text_string_to_metric_families(text)}["gpt2serve:num_requests_running"]
    assert sorted(s.labels["replica"] for s in fam.samples) == ["a", "b"]


def test_prefix_cache_counters_follow_the_engine_stats():
    """The engine's cumulative prefix-cache stats become counters (incremented by the difference at each tick)."""
    backend = PrometheusBackend()
    rec = ServingMetrics(backend, "tiny", "r0", Cost(), clock=FakeClock())
    rec.tick({"prefix_cache_queries": 100, "prefix_cache_hits": 48, "prefix_cache_evictions": 0})
    rec.tick({"prefix_cache_queries": 250, "prefix_cache_hits": 80, "prefix_cache_evictions": 3})
    rec.tick({})  # an engine without prefix caching reports none: nothing moves backwards
    assert value(backend, "prefix_cache_queries_total") == 250
    assert value(backend, "prefix_cache_hits_total") == 80
    assert value(backend, "prefix_cache_evictions_total") == 3
