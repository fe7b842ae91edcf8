"""Prometheus gauges from the scheduler's snapshot: the global queue and every worker's engine stats.

Built fresh at each scrape from the workers' latest heartbeats, so a replica that is gone disappears from
``/metrics`` instead of leaving a stale series behind. Names follow vLLM's style (``vllm:num_requests_running``
becomes ``gpt2serve:num_requests_running``), labelled by worker replica.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

# engine stat -> (metric name, help)
ENGINE_GAUGES = {
    "num_running": ("num_requests_running", "Sequences in the engine's running batch."),
    "num_waiting": ("num_requests_waiting", "Sequences waiting inside the engine."),
    "num_swapped": ("num_requests_swapped", "Sequences swapped out to CPU memory."),
    "kv_usage": ("kv_cache_usage_perc", "Fraction of the KV pool in use (0..1)."),
    "num_free_blocks": ("kv_cache_free_blocks", "Free KV blocks."),
    "num_total_blocks": ("kv_cache_total_blocks", "KV blocks in the pool."),
}
SKIP = {"worker_id", "actor_name", "block_size", "max_num_seqs", "max_model_len", "active_request_ids"}


class SnapshotCollector:
    def __init__(self, snapshot: dict[str, Any], prefix: str = "gpt2serve:"):
        self.snapshot = snapshot
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield GaugeMetricFamily(f"{p}scheduler_queue_length", "Requests waiting in the global queue.",
                                value=self.snapshot["num_waiting"])
        yield GaugeMetricFamily(f"{p}num_workers", "Model-worker replicas routed to.",
                                value=len(self.snapshot["workers"]))
        for name, value in sorted(self.snapshot["counters"].items()):
            yield GaugeMetricFamily(f"{p}scheduler_{name}", f"Scheduler counter {name} (since start).", value=value)

        families: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            if name not in families:
                families[name] = GaugeMetricFamily(f"{p}{name}", doc, labels=["worker"])
            return families[name]

        for worker_id, w in sorted(self.snapshot["workers"].items()):
            gauge("worker_inflight_requests", "Requests the scheduler has routed to the worker.").add_metric(
                [worker_id], w["inflight"])
            gauge("worker_load_tokens", "Prompt + output budget of the requests routed to the worker.").add_metric(
                [worker_id], w["load_tokens"])
            for key, value in sorted(w["stats"].items()):
                if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                default = (f"worker_{key}", f"Worker counter {key}.") if key.startswith("requests_") else (
                    f"engine_{key}", f"Engine statistic {key}.")
                name, doc = ENGINE_GAUGES.get(key, default)
                gauge(name, doc).add_metric([worker_id], value)
        yield from families.values()
