"""The model workers' autoscaling policy: requests held by the engines, not calls counted by Serve.

Serve's default policy divides ongoing calls by ``target_ongoing_requests``. A worker's calls are a few
long-lived channels (one per ingress replica), so that count says nothing about its load. Each worker reports
``engine_load`` instead (``ModelWorker.record_autoscaling_stats``): the requests it runs plus its share of the
scheduler's global queue, so that requests waiting for a worker also ask for more workers. Serve applies
min/max replicas, upscale/downscale delays and smoothing around this function, as for its own policy.
"""

from __future__ import annotations

from typing import Any

from gpt2serve.actors.worker import AUTOSCALING_METRIC

POLICY_PATH = "gpt2serve.actors.autoscaling:engine_load_policy"


def desired_replicas(loads: list[float], target_per_replica: float) -> float:
    return sum(loads) / target_per_replica


def engine_load_policy(ctx) -> tuple[float, dict[str, Any]]:
    loads = (ctx.aggregated_metrics or {}).get(AUTOSCALING_METRIC)
    if not loads:  # no report yet (replicas starting): keep what we have
        return ctx.current_num_replicas, {}
    return desired_replicas(list(loads.values()), ctx.config.get_target_ongoing_requests()), {}
