"""Prometheus gauges from the scheduler's snapshot: the global queue and every worker's engine stats.

Built fresh at each scrape from the workers' latest heartbeats, so a replica that is gone disappears from
``/metrics`` instead of leaving a stale series behind. Names follow vLLM's style, labelled by worker replica.
The engine gauges and counters that the workers export themselves (``engine/metrics.py``: running / waiting /
swapped, KV usage, ...) are left out here, so that each name has one source. Rejections are counted by the
scheduler, so ``gpt2serve:request_rejected_total`` comes from its counters, with ``replica="scheduler"``, and so
does ``gpt2serve:router_decisions_total{reason}`` from its routing policy's.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpt2serve.actors.routing import REASONS
from gpt2serve.engine.metrics import PREFIX, PREFIX_CACHE_COUNTERS, SCHEDULER_METRICS

# engine stat -> (metric name, help)
ENGINE_GAUGES = {
    "num_free_blocks": ("kv_cache_free_blocks", "Free KV blocks."),
    "num_total_blocks": ("kv_cache_total_blocks", "KV blocks in the pool."),
}
SKIP = {"worker_id", "actor_name", "block_size", "max_num_seqs", "max_model_len", "active_request_ids",
        "num_running", "num_waiting", "num_swapped", "kv_usage",  # these four and the prefix-cache counters:
        *PREFIX_CACHE_COUNTERS}  # the workers export them
REJECTIONS = {"rejected_queue_full": "queue_full", "rejected_too_large": "too_large",
              "rejected_queue_timeout": "queue_timeout"}
SCHEDULER_REPLICA = "scheduler"


class SnapshotCollector:
    def __init__(self, snapshot: dict[str, Any], prefix: str = "gpt2serve:", model_name: str = ""):
        self.snapshot = snapshot
        self.prefix = prefix
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield GaugeMetricFamily(f"{p}scheduler_queue_length", "Requests waiting in the global queue.",
                                value=self.snapshot["num_waiting"])
        yield GaugeMetricFamily(f"{p}num_workers", "Model-worker replicas routed to.",
                                value=len(self.snapshot["workers"]))
        for name, value in sorted(self.snapshot["counters"].items()):
            yield GaugeMetricFamily(f"{p}scheduler_{name}", f"Scheduler counter {name} (since start).", value=value)
        spec = SCHEDULER_METRICS["request_rejected"]
        rejected = CounterMetricFamily(PREFIX + spec.name, spec.doc, labels=spec.labels)
        for key, reason in REJECTIONS.items():
            rejected.add_metric([self.model_name, SCHEDULER_REPLICA, reason], self.snapshot["counters"].get(key, 0))
        yield rejected
        spec = SCHEDULER_METRICS["router_decisions"]
        decisions = CounterMetricFamily(PREFIX + spec.name, spec.doc, labels=spec.labels)
        counted = self.snapshot.get("routing", {}).get("decisions", {})
        for reason in REASONS:
            decisions.add_metric([self.model_name, SCHEDULER_REPLICA, reason], counted.get(reason, 0))
        yield decisions

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
            gauge("router_cached_blocks", "Block hashes the router knows the worker's prefix cache holds (from its "
                  "events), without the optimistic ones.").add_metric([worker_id], w.get("cached_blocks", 0))
            for key, value in sorted(w["stats"].items()):
                if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                default = (f"worker_{key}", f"Worker counter {key}.") if key.startswith("requests_") else (
                    f"engine_{key}", f"Engine statistic {key}.")
                name, doc = ENGINE_GAUGES.get(key, default)
                gauge(name, doc).add_metric([worker_id], value)
        yield from families.values()
