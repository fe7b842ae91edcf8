"""Builds the Ray Serve application: ``serve run configs/gpt2xl.yaml`` reaches ``build_app`` by ``import_path``.

    client ──HTTP──▶ Ingress ──admit / release──▶ Scheduler (one replica: global queue, routing)
                        │  ◀── heartbeats ──────────────┘ ▲
                        └──generate (pinned, streamed)──▶ ModelWorker × N (AsyncLLM + paged KV pool)

The application ``args`` are a ``actors.settings.ServiceConfig``: ``engine:`` (an ``EngineConfig``) plus the
service around it. Offline runs override the weights without editing the file:

    GPT2SERVE_LOAD_FORMAT=dummy serve run configs/gpt2xl.yaml
    serve run gpt2serve.serve_app:build_app config=configs/gpt2xl.yaml load_format=dummy

(``serve run`` ignores ``key=value`` arguments after a config file, hence the second form.)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from gpt2serve.actors.autoscaling import POLICY_PATH
from gpt2serve.actors.ingress import Ingress
from gpt2serve.actors.replica_router import PinnedReplicaRouter
from gpt2serve.actors.scheduler import Scheduler
from gpt2serve.actors.settings import ServiceConfig
from gpt2serve.actors.worker import ModelWorker


WORKER = "ModelWorker"
# Serve notices a dead replica at its next health check (every 10 s by default). The scheduler is a single replica
# that every request's admission waits on, so it is checked more often: a killed scheduler is replaced seconds
# later (docs/serving.md#deadlines-and-faults). A config's own scheduler.health_check_period_s wins.
SCHEDULER_HEALTH_CHECK_PERIOD_S = 2.0


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = ServiceConfig.from_args(args)
    config = cfg.model_dump(mode="json")
    scheduler = serve.deployment(Scheduler, name="Scheduler").options(
        **{"health_check_period_s": SCHEDULER_HEALTH_CHECK_PERIOD_S, **cfg.scheduler.serve_options()}).bind(
        config, WORKER)
    worker = serve.deployment(ModelWorker, name=WORKER).options(
        request_router_config=RequestRouterConfig(
            request_router_class=PinnedReplicaRouter, request_router_kwargs={"pin_wait_s": cfg.pin_wait_s}),
        **worker_options(cfg),
    ).bind(cfg.engine.model_dump(mode="json"), scheduler, cfg.heartbeat_interval_s, cfg.channel_idle_s,
           telemetry_args(cfg), cfg.worker_gil_switch_interval_s, cfg.worker_health.model_dump(), cfg.fault_injection)
    return serve.deployment(Ingress, name="Ingress").options(**cfg.ingress.serve_options()).bind(
        config, scheduler, worker)


def telemetry_args(cfg: ServiceConfig) -> dict[str, Any]:
    """What a worker's metrics need: the model's name for labels, and the price of the GPUs it holds."""
    return {"model_name": cfg.model_name, "cost": cfg.cost.model_dump(mode="json"),
            "actor_num_gpus": sum(b.get("GPU", 0.0) for b in worker_options(cfg).get(
                "placement_group_bundles", [{"GPU": cfg.worker.ray_actor_options.get("num_gpus", 0)}]))}


def worker_options(cfg: ServiceConfig) -> dict[str, Any]:
    """Serve options of the worker deployment; autoscaling goes by engine load unless a policy is named. A
    tensor/pipeline-parallel engine gets a placement group of one bundle per rank, each with the replica's own
    CPUs and GPUs (engine/distributed.py starts the other ranks in them)."""
    opts = cfg.worker.serve_options()
    ranks = cfg.engine.num_ranks
    if ranks > 1 and "placement_group_bundles" not in opts:
        actor = cfg.worker.ray_actor_options
        bundle = {"CPU": float(actor.get("num_cpus", 1))}
        if actor.get("num_gpus"):
            bundle["GPU"] = float(actor["num_gpus"])
        opts["placement_group_bundles"] = [dict(bundle) for _ in range(ranks)]
    if "placement_group_bundles" in opts:
        opts.setdefault("placement_group_strategy", "STRICT_PACK")
    if "autoscaling_config" in opts and "policy" not in opts["autoscaling_config"]:
        opts["autoscaling_config"] = {**opts["autoscaling_config"], "policy": {"policy_function": POLICY_PATH}}
    return opts
