"""The service's settings: the application ``args`` of a Serve config, as one pydantic model.

``args.engine`` is an ``EngineConfig``; the rest is the service around it. Overrides apply in this order,
later winning: the YAML, then ``GPT2SERVE_<ENGINE FIELD>`` environment variables (``GPT2SERVE_LOAD_FORMAT=dummy``),
then flat ``key=value`` arguments naming either an engine field or a service field
(``serve run gpt2serve.serve_app:build_app config=configs/gpt2xl.yaml load_format=dummy``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.metrics import CostConfig
from gpt2serve.engine.sampling_params import MAX_LOGPROBS

ENV_PREFIX = "GPT2SERVE_"
API_KEY_ENV = ENV_PREFIX + "API_KEY"
LORA_UPDATING_ENV = ENV_PREFIX + "ALLOW_RUNTIME_LORA_UPDATING"
# Serve's own cap on concurrent calls per replica (default 5) would throttle an engine that batches by itself;
# every deployment gets far more than any batch, and admission is done by the scheduler instead.
DEFAULT_MAX_ONGOING = 4096


class DeploymentSettings(BaseModel):
    """Serve options of one deployment, passed through to ``Deployment.options``."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling_config).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests, ...")
    max_ongoing_requests: int = Field(DEFAULT_MAX_ONGOING, ge=1)
    ray_actor_options: dict[str, Any] = Field(default_factory=dict, description="num_cpus, num_gpus, ...")
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    logging_config: dict[str, Any] | None = Field(None, description="Serve logging, e.g. {enable_access_log: false}.")
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None, description="Resources of each rank of a tensor/pipeline-parallel worker (bundle 0: the replica "
        "itself); derived from ray_actor_options when the engine has several ranks and this is not given.")
    placement_group_strategy: str | None = Field(None, description="STRICT_PACK (default with bundles): one node.")

    @model_validator(mode="after")
    def _target_below_cap(self) -> "DeploymentSettings":
        target = (self.autoscaling_config or {}).get("target_ongoing_requests")
        if target is not None and target >= self.max_ongoing_requests:
            # Serve never sees more than max_ongoing_requests per replica, so it would never scale up.
            raise ValueError(f"autoscaling target_ongoing_requests ({target}) must be below "
                             f"max_ongoing_requests ({self.max_ongoing_requests})")
        return self

    def serve_options(self) -> dict[str, Any]:
        opts = self.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            opts.pop("num_replicas", None)
        return opts


class HTTPListenerSettings(BaseModel):
    """The ingress replicas serve HTTP themselves on this address (``actors/http_listener.py``)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("0.0.0.0", description="Interface to listen on (127.0.0.1: this machine only).")
    port: int = Field(8000, ge=0, le=65535, description="One port, shared by every ingress replica of a node.")
    graceful_shutdown_s: float = Field(30.0, ge=0, description="On shutdown, how long requests in flight get.")


class RequestLimits(BaseModel):
    """What one request may ask for, past which it gets a 400 naming the field: each of these costs CPU on the
    ingress or on the engine's step thread per sequence per step, so none is left unbounded."""

    model_config = ConfigDict(extra="forbid")

    max_stop: int = Field(16, ge=0, description="Stop strings per request (every one is checked on every step).")
    max_stop_length: int = Field(256, ge=1, description="Characters in one stop string.")
    max_stop_token_ids: int = Field(64, ge=0, description="stop_token_ids per request.")
    max_batch_sequences: int = Field(
        128, ge=1, description="Prompts of one completions request times n: the sequences one request starts.")
    max_logprobs: int = Field(MAX_LOGPROBS, ge=0, le=MAX_LOGPROBS, description="logprobs / top_logprobs.")
    max_messages: int = Field(256, ge=1, description="Messages in one chat request.")
    max_request_id_length: int = Field(128, ge=1, description="Characters in a client's X-Request-Id.")


class WorkerHealthSettings(BaseModel):
    """When a worker fails its Serve health check, so that Serve replaces it (``engine/watchdog.py``)."""

    model_config = ConfigDict(extra="forbid")

    stall_timeout_s: float | None = Field(
        120.0, gt=0, description="No engine step completed for this long while the worker holds requests (a hung "
        "kernel, a dead device): unhealthy. Above the slowest legitimate step (a long prefill, a first-call "
        "compile). None: never.")
    max_failed_steps: int | None = Field(
        3, ge=1, description="This many engine steps in a row raised: unhealthy. None: never.")


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    engine: EngineConfig = Field(default_factory=EngineConfig)
    served_model_name: str | None = Field(None, description="Model name in the API; defaults to engine.model.")

    # --- admission and routing (the scheduler deployment) ---
    max_queued_requests: int = Field(1024, ge=0, description="Past this many waiting requests: HTTP 429.")
    queue_timeout_s: float = Field(
        600.0, gt=0, description="A request waiting longer than this in the global queue gets HTTP 503 + Retry-After.")
    min_retry_after_s: float = Field(1.0, gt=0)
    routing_policy: str = Field(
        "prefix_aware", description="How a worker is picked: prefix_aware (the replica whose prefix cache holds the "
        "longest prefix of the prompt, within max_imbalance_tokens of the least loaded), least_loaded.")
    routing_policy_args: dict[str, Any] = Field(
        default_factory=dict, description="Arguments of the routing policy: max_imbalance_tokens (both), "
        "optimistic_ttl_s (prefix_aware: how long a routed prompt counts as cached before the worker confirms).")
    max_inflight_per_worker: int | None = Field(
        None, ge=1, description="Sequences routed to one worker at once; defaults to engine.max_num_seqs.")
    kv_overcommit: float = Field(
        1.0, gt=0, description="Reserve up to this multiple of a worker's KV pool.")
    kv_reserve_output: str = Field(
        "mean", pattern=r"^(mean|max_tokens|p(\d{1,2}(\.\d+)?|100))$",
        description="The output part of a request's KV reservation: 'mean' (of how many tokens the service's recent "
        "requests really wrote; the engine preempts in the rare step where the pool is short), a quantile such as "
        "'p95', or 'max_tokens' (all of it: no preemption ever needed, far fewer requests at once).")
    heartbeat_interval_s: float = Field(0.5, gt=0)
    worker_timeout_s: float = Field(10.0, gt=0, description="A worker silent this long is dropped from routing.")
    lease_grace_s: float = Field(30.0, gt=0)
    pin_wait_s: float = Field(1.0, ge=0, description="How long a call waits for its chosen replica to appear.")
    worker_gil_switch_interval_s: float | None = Field(
        None, gt=0, description="sys.setswitchinterval in each worker process: how long the engine's step thread "
        "may wait for the GIL held by the replica's event loops (None: Python's default, 5 ms).")
    channel_idle_s: float = Field(
        10.0, gt=0, description="A worker closes an ingress's token channel after this long without requests.")

    # --- deadlines and faults (docs/serving.md#deadlines-and-faults) ---
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request's deadline when it names none, from its arrival at the ingress to its "
        "last token: past it the request is aborted on its worker and answered 408 (an SSE error event once "
        "streaming). 600 s is the OpenAI client's own default timeout.")
    max_request_timeout_s: float = Field(
        1800.0, gt=0, description="The largest `timeout` a request may ask for (400 above it). Keep Serve's "
        "http_options.request_timeout_s above it, so that this service's own 408 answers first.")
    worker_health: WorkerHealthSettings = Field(default_factory=WorkerHealthSettings)
    fault_injection: bool = Field(
        False, description="Tests only: wrap each worker's engine so that `inject_fault` calls can make its steps "
        "raise or hang (actors/faults.py). Off, the engine is not wrapped and `inject_fault` is refused.")

    # --- telemetry (engine/metrics.py, docs/telemetry.md) ---
    cost: CostConfig = Field(default_factory=CostConfig, description="Price per GPU-hour by node type, and how "
                             "many GPUs a worker replica pays for: the cost metrics.")

    # --- API ---
    http_listener: HTTPListenerSettings | None = Field(
        None, description="Serve HTTP from the ingress replicas themselves, every replica on this one port (set "
        "proxy_location: Disabled so that Serve's proxy does not hold it). None: through Serve's HTTP proxy.")
    max_n: int = Field(16, ge=1, description="Largest n a request may ask for.")

    # --- security and limits (docs/serving.md#security-and-limits) ---
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Keys a client must send as `Authorization: Bearer <key>` on "
        "every route but /health and the playground's static files; GPT2SERVE_API_KEY adds more (comma-separated). "
        "None: the service is open (and says so in its log when it listens beyond this machine).")
    allow_runtime_lora_updating: bool = Field(
        False, description="Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); needs engine.enable_lora and lora_allowed_roots.")
    lora_allowed_roots: list[str] = Field(
        default_factory=list, description="Directories under which /v1/load_lora_adapter may read adapters "
        "(symbolic links resolved before the check).")
    cors_allowed_origins: list[str] = Field(
        default_factory=list, description="Origins whose pages may call the API from a browser ('*': any). "
        "Empty: none (closed).")
    max_request_body_bytes: int = Field(2 << 20, ge=1, description="Larger POST bodies get HTTP 413.")
    limits: RequestLimits = Field(default_factory=RequestLimits)

    # --- deployments ---
    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(ray_actor_options={"num_cpus": 1}))
    # Access logs of the internal deployments would log every admit / release / heartbeat / generate call.
    scheduler: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(
        ray_actor_options={"num_cpus": 0.5}, logging_config={"enable_access_log": False}))
    worker: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(
        ray_actor_options={"num_cpus": 1}, logging_config={"enable_access_log": False}))

    @model_validator(mode="after")
    def _single_scheduler(self) -> "ServiceConfig":
        # The global queue lives in one process; two schedulers would each admit against stale reservations.
        if self.scheduler.autoscaling_config is not None or (self.scheduler.num_replicas or 1) != 1:
            raise ValueError("the scheduler deployment holds the global queue: it must have exactly one replica")
        return self

    @model_validator(mode="after")
    def _default_timeout_within_max(self) -> "ServiceConfig":
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s}) must not exceed max_request_timeout_s "
                             f"({self.max_request_timeout_s})")
        return self

    @model_validator(mode="after")
    def _lora_updating_has_roots(self) -> "ServiceConfig":
        if self.allow_runtime_lora_updating and not (self.engine.enable_lora and self.lora_allowed_roots):
            raise ValueError("allow_runtime_lora_updating needs engine.enable_lora: true and lora_allowed_roots "
                             "(the directories adapters may be loaded from)")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> "ServiceConfig":
        """Build from Serve application args, applying environment and flat ``key=value`` overrides."""
        args = dict(args or {})
        env = os.environ if env is None else env
        base: dict[str, Any] = {}
        if "config" in args:  # serve run gpt2serve.serve_app:build_app config=configs/x.yaml ...
            data = yaml.safe_load(Path(args.pop("config")).read_text()) or {}
            base = data["applications"][0].get("args", {}) if "applications" in data else data
        nested = {k: v for k, v in args.items() if isinstance(v, Mapping)}
        flat = {k: v for k, v in args.items() if not isinstance(v, Mapping)}
        merged = {**base, **nested}
        engine = dict(merged.get("engine") or {})
        engine_fields = set(EngineConfig.model_fields)
        for key, value in env.items():
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in engine_fields:
                engine[key[len(ENV_PREFIX):].lower()] = yaml.safe_load(value)
        for key, value in flat.items():
            # Command-line values arrive as strings: "8" -> 8, "true" -> True, "dummy" -> "dummy".
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if key in engine_fields:
                engine[key] = value
            else:
                merged[key] = value
        if env.get(API_KEY_ENV):  # a secret: kept out of config files, added to theirs
            merged["api_keys"] = [*merged.get("api_keys", []), *filter(None, env[API_KEY_ENV].split(","))]
        if env.get(LORA_UPDATING_ENV):
            merged["allow_runtime_lora_updating"] = yaml.safe_load(env[LORA_UPDATING_ENV])
        merged["engine"] = engine
        return cls(**merged)
