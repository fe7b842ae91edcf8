"""Serving metrics: their names (vLLM's style, our ``gpt2serve:`` prefix), where they go, and what they cost.

One table, ``METRICS`` (the workers' ``WORKER_METRICS`` and the scheduler's ``SCHEDULER_METRICS``), names every
metric once; the recorder, the dashboards (``dashboards/``) and the tests all read it. ``ServingMetrics`` is the
recorder a model worker drives: ``request_started`` / ``on_output`` / ``request_ended`` per request, ``on_step``
per engine step (fed by ``observe_steps`` through the engine's step observers), ``tick`` from a timer. It is plain Python behind a small ``Backend``
interface, so it runs in unit tests with ``PrometheusBackend`` alone, and in the service with both that (read by
the ingress's ``/metrics``) and ``RayBackend`` (Ray's metrics endpoint, hence the Ray dashboard and any
Prometheus that scrapes Ray).

Names: ``gpt2serve:<name>`` through prometheus_client; Ray 2.60 no longer accepts ``:`` in metric names and adds
its own ``ray_`` prefix, so the same metric there is ``ray_gpt2serve_<name>``. Counters are declared without
``_total``; both exporters append it.

Cost: a replica that holds ``num_gpus`` GPUs costs ``num_gpus * price_per_gpu_hour / 3600`` dollars per second of
wall time, busy or idle, from its start: ``gpu_seconds_total`` and ``cost_dollars_total`` grow together at each
``tick``, so ``cost_dollars_total == gpu_seconds_total * price / 3600`` holds exactly. A request's own cost is its
share of the steps it took part in: each step's ``duration * num_gpus`` is split over the requests in it in
proportion to the tokens each had in the step (prefill chunks weigh their length, a decode one token).
Idle time belongs to no request, so the per-request costs add up to at most the counter; the $/1M output tokens
in PromQL divides the counter (idle included) by generated tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "gpt2serve:"
RAY_PREFIX = "gpt2serve_"  # Ray exports it as ray_gpt2serve_<name>
LABELS = ("model_name", "replica")

_LATENCY = (.001, .005, .01, .02, .04, .06, .08, .1, .15, .2, .25, .3, .4, .5, .75, 1, 1.5, 2, 2.5, 5, 7.5, 10,
            20, 40, 80, 160, 640)
_TPOT = (.001, .002, .003, .004, .005, .0075, .01, .0125, .015, .02, .025, .03, .04, .05, .075, .1, .15, .2, .3,
         .5, .75, 1, 2.5)
_E2E = (.05, .1, .25, .5, .75, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20, 30, 40, 60, 120, 300, 600)
_STEP = (.0005, .001, .002, .003, .004, .005, .0075, .01, .0125, .015, .02, .025, .03, .04, .05, .075, .1, .15,
         .25, .5, 1, 2.5)
_DOLLARS = tuple(m * 10.0 ** e for e in range(-8, 0) for m in (1, 2.5, 5))


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without prefix; counters without "_total"
    kind: Literal["counter", "gauge", "histogram"]
    doc: str
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS + self.extra_labels

    def series(self, prefix: str = PREFIX) -> str:
        """The name a query uses: ``_total`` on counters, ``_bucket`` etc. are for the caller to add."""
        return f"{prefix}{self.name}_total" if self.kind == "counter" else f"{prefix}{self.name}"


_SPECS = [
    # --- latency, one observation per finished request unless stated
    MetricSpec("time_to_first_token_seconds", "histogram", "Engine arrival to first token.", buckets=_LATENCY),
    MetricSpec("time_per_output_token_seconds", "histogram",
               "Mean time per output token after the first, per request: (finished - first token) / (tokens - 1).",
               buckets=_TPOT),
    MetricSpec("e2e_request_latency_seconds", "histogram", "Engine arrival to last token.", buckets=_E2E),
    MetricSpec("request_queue_time_seconds", "histogram", "Engine arrival to first scheduled (waiting in the engine).",
               buckets=_LATENCY),
    MetricSpec("step_time_seconds", "histogram", "Wall time of one engine step; phase=prefill if the step computed "
               "any prompt tokens (mixed steps included), else decode.", ("phase",), _STEP),
    # --- tokens and requests
    MetricSpec("prompt_tokens", "counter", "Prompt tokens of requests that produced their first token."),
    MetricSpec("generation_tokens", "counter", "Tokens generated (all samples), counted as they are produced."),
    MetricSpec("request_success", "counter", "Requests finished, by the first sample's finish reason.",
               ("finished_reason",)),
    MetricSpec("request_aborted", "counter", "Requests aborted before they finished (client gone, worker error)."),
    MetricSpec("num_preemptions", "counter", "Sequences preempted (recompute or swap)."),
    MetricSpec("num_swap_out", "counter", "Sequences swapped out to CPU memory."),
    MetricSpec("num_swap_in", "counter", "Sequences swapped back in."),
    # --- capacity, set at every tick
    MetricSpec("num_requests_running", "gauge", "Sequences in the engine's running batch."),
    MetricSpec("num_requests_waiting", "gauge", "Sequences waiting inside the engine."),
    MetricSpec("num_requests_swapped", "gauge", "Sequences swapped out to CPU memory."),
    MetricSpec("kv_cache_usage_perc", "gauge", "Fraction of the KV pool in use (0..1)."),
    MetricSpec("gpu_memory_used_bytes", "gauge", "Device memory in use on the worker's GPU (0 on a CPU worker)."),
    # --- prefix cache (vLLM's vllm:prefix_cache_queries / _hits); hit rate = rate(hits) / rate(queries)
    MetricSpec("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    MetricSpec("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache (not computed again)."),
    MetricSpec("prefix_cache_evictions", "counter", "Cached KV blocks evicted from the prefix cache for reuse."),
    # --- speculative decoding (vLLM's vllm:spec_decode_*); acceptance rate = rate(accepted) / rate(draft tokens),
    # mean tokens per verify step = 1 + rate(accepted) / rate(drafts), by position from the _per_pos pair
    MetricSpec("spec_decode_num_drafts", "counter", "Verify steps, counted per request (each verifies one draft)."),
    MetricSpec("spec_decode_num_draft_tokens", "counter", "Proposed tokens verified by the target."),
    MetricSpec("spec_decode_num_accepted_tokens", "counter", "Proposed tokens the target accepted."),
    MetricSpec("spec_decode_num_draft_tokens_per_pos", "counter", "Proposed tokens verified, by position in the "
               "draft (0 = the first proposal).", ("position",)),
    MetricSpec("spec_decode_num_accepted_tokens_per_pos", "counter", "Proposed tokens accepted, by position in the "
               "draft.", ("position",)),
    # --- cost
    MetricSpec("num_gpus", "gauge", "GPUs the replica holds (and pays for)."),
    MetricSpec("gpu_price_dollars_per_hour", "gauge", "Configured price of one GPU-hour on the replica's node type.",
               ("node_type",)),
    MetricSpec("gpu_seconds", "counter", "GPU-seconds held: wall time since the replica started x num_gpus."),
    MetricSpec("gpu_busy_seconds", "counter", "GPU-seconds spent in engine steps: step time x num_gpus."),
    MetricSpec("cost_dollars", "counter", "Dollars spent: gpu_seconds x price per GPU-hour / 3600."),
    MetricSpec("request_cost_dollars", "histogram", "Per finished request: its token share of the steps it was "
               "in, in dollars (idle time is in cost_dollars_total only).", buckets=_DOLLARS),
]
# The scheduler's: on /metrics from its snapshot (actors/metrics.py), on Ray with replica="scheduler".
_SCHEDULER_SPECS = [
    MetricSpec("request_rejected", "counter", "Requests refused by admission: reason=queue_full (HTTP 429), "
               "too_large (HTTP 400) or queue_timeout (HTTP 503, waited queue_timeout_s).", ("reason",)),
    MetricSpec("scheduler_queue_length", "gauge", "Requests waiting in the global queue for a worker (on /metrics "
               "without labels)."),
    MetricSpec("router_decisions", "counter", "Requests routed, by reason: prefix_match (to the worker caching the "
               "longest prefix), load_fallback (that worker was too busy), load (no worker cached any of it).",
               ("reason",)),
]
WORKER_METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}
# Engine stats (``LLMEngine.stats()``, cumulative) exported under the same names as counters.
PREFIX_CACHE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_evictions")
SPEC_DECODE_COUNTERS = {"spec_num_steps": "spec_decode_num_drafts", "spec_num_draft_tokens": "spec_decode_num_draft_tokens",
                        "spec_num_accepted_tokens": "spec_decode_num_accepted_tokens"}
SCHEDULER_METRICS: dict[str, MetricSpec] = {s.name: s for s in _SCHEDULER_SPECS}
METRICS: dict[str, MetricSpec] = {**WORKER_METRICS, **SCHEDULER_METRICS}


# ---------------------------------------------------------------------- backends
class Handle(Protocol):
    def record(self, value: float, labels: tuple[str, ...]) -> None: ...


class Backend(Protocol):
    def make(self, spec: MetricSpec) -> Handle: ...


class PrometheusBackend:
    """prometheus_client metrics in their own registry (read with ``families()`` or ``generate_latest``)."""

    def __init__(self, registry=None, prefix: str = PREFIX):
        from prometheus_client import CollectorRegistry, disable_created_metrics

        disable_created_metrics()  # process-wide: no "<counter>_created" series beside every counter
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.prefix = prefix

    def make(self, spec: MetricSpec) -> Handle:
        import prometheus_client as pc

        cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[spec.kind]
        kwargs = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
        metric = cls(self.prefix + spec.name, spec.doc, spec.labels, registry=self.registry, **kwargs)
        method = {"counter": "inc", "gauge": "set", "histogram": "observe"}[spec.kind]
        children: dict[tuple[str, ...], Callable[[float], None]] = {}

        class _Handle:
            def record(self, value: float, labels: tuple[str, ...]) -> None:
                fn = children.get(labels)
                if fn is None:
                    fn = children[labels] = getattr(metric.labels(*labels), method)
                fn(value)

        return _Handle()

    def families(self) -> list:
        """The registry's metric families: plain, picklable objects another process can merge and expose."""
        return list(self.registry.collect())


class RayBackend:
    """ray.util.metrics, exported by Ray's per-node metrics agent as ``ray_gpt2serve_<name>``."""

    def __init__(self, prefix: str = RAY_PREFIX):
        self.prefix = prefix

    def make(self, spec: MetricSpec) -> Handle:
        from ray.util import metrics as rm

        name = self.prefix + spec.name
        if spec.kind == "histogram":
            metric = rm.Histogram(name, spec.doc, boundaries=list(spec.buckets), tag_keys=spec.labels)
        else:
            metric = (rm.Counter if spec.kind == "counter" else rm.Gauge)(name, spec.doc, tag_keys=spec.labels)
        keys = spec.labels
        record = getattr(metric, {"counter": "inc", "gauge": "set", "histogram": "observe"}[spec.kind])
        is_counter = spec.kind == "counter"

        class _Handle:
            def record(self, value: float, labels: tuple[str, ...]) -> None:
                if is_counter and value <= 0:  # Ray refuses inc(0)
                    return
                record(value, dict(zip(keys, labels)))

        return _Handle()


class FanoutBackend:
    def __init__(self, *backends: Backend):
        self.backends = backends

    def make(self, spec: MetricSpec) -> Handle:
        handles = [b.make(spec) for b in self.backends]

        class _Handle:
            def record(self, value: float, labels: tuple[str, ...]) -> None:
                for h in handles:
                    h.record(value, labels)

        return _Handle()


# ---------------------------------------------------------------------- cost
class CostConfig(BaseModel):
    """What a worker replica costs. Service setting ``cost:``."""

    model_config = ConfigDict(extra="forbid")

    gpu_hour_prices: dict[str, float] = Field(
        default_factory=dict, description="Dollars per GPU-hour by node type, e.g. {H100: 3.0, A10G: 1.0}. A key "
        "matches when it occurs in the node type, case-insensitively (H100 matches 'NVIDIA H100 80GB HBM3').")
    default_gpu_hour_price: float = Field(0.0, ge=0, description="Price when no key of gpu_hour_prices matches.")
    node_type: str | None = Field(None, description="Node type to price; default: the worker's GPU name, or 'cpu'.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs a worker replica pays for; default: its "
                                   "ray_actor_options.num_gpus (so 0 on a CPU worker).")

    def resolve(self, device_name: str | None, actor_num_gpus: float) -> "Cost":
        node_type = self.node_type or device_name or "cpu"
        price = next((p for k, p in self.gpu_hour_prices.items() if k.lower() in node_type.lower()),
                     self.default_gpu_hour_price)
        num_gpus = self.num_gpus if self.num_gpus is not None else actor_num_gpus
        return Cost(num_gpus=float(num_gpus), price_per_gpu_hour=float(price), node_type=node_type)


@dataclass(frozen=True)
class Cost:
    num_gpus: float = 0.0
    price_per_gpu_hour: float = 0.0
    node_type: str = "cpu"

    @property
    def dollars_per_gpu_second(self) -> float:
        return self.price_per_gpu_hour / 3600.0


# ---------------------------------------------------------------------- the recorder
@dataclass
class _Req:
    samples: dict[int, int] = field(default_factory=dict)  # tokens generated so far, by sample index
    busy_s: float = 0.0  # its token share of the steps it was in
    counted_prompt: bool = False


@dataclass
class StepInfo:
    """What one engine step did, per user request id (samples of one request summed)."""

    duration_s: float
    tokens: dict[str, int]
    num_prefill_tokens: int
    num_decode_tokens: int
    queue_times: dict[str, float] = field(default_factory=dict)  # requests scheduled for the first time


class ServingMetrics:
    """Per-request and per-step metrics of one model-worker replica. Thread-safe: steps are observed on the
    engine's thread, outputs on the event loop's."""

    def __init__(self, backend: Backend, model_name: str, replica: str, cost: Cost = Cost(),
                 clock: Callable[[], float] = time.monotonic, started_at: float | None = None):
        self.labels = (model_name, replica)
        self.cost = cost
        self.clock = clock
        self.m = {name: backend.make(spec) for name, spec in WORKER_METRICS.items()}
        self._lock = threading.Lock()
        self._reqs: dict[str, _Req] = {}
        self._pending = {"prompt_tokens": 0, "generation_tokens": 0, "gpu_busy_seconds": 0.0}
        self._engine_counters: dict[str, int] = {}
        self._last_tick = clock() if started_at is None else started_at  # GPU time accrues from here

    # --- requests
    def request_started(self, request_id: str) -> None:
        with self._lock:
            self._reqs[request_id] = _Req()

    def on_output(self, out) -> None:
        """One ``RequestOutput`` delta of a streaming request."""
        new = 0
        with self._lock:
            req = self._reqs.get(out.request_id)
            if req is None:
                return
            for c in out.outputs:
                new += len(c.token_ids)
                req.samples[c.index] = req.samples.get(c.index, 0) + len(c.token_ids)
            self._pending["generation_tokens"] += new
            if not req.counted_prompt and new:
                req.counted_prompt = True
                self._pending["prompt_tokens"] += len(out.prompt_token_ids)
            if not out.finished:
                return
            del self._reqs[out.request_id]
        labels, t = self.labels, out.metrics
        arrival, first, end = t["arrival_time"], t.get("first_token_time"), t.get("finished_time")
        longest = max(req.samples.values(), default=0)
        if first is not None:
            self.m["time_to_first_token_seconds"].record(first - arrival, labels)
            if end is not None and longest > 1:
                self.m["time_per_output_token_seconds"].record((end - first) / (longest - 1), labels)
        if end is not None:
            self.m["e2e_request_latency_seconds"].record(end - arrival, labels)
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason), None) or "unknown"
        self.m["request_success"].record(1, labels + (reason,))
        self.m["request_cost_dollars"].record(
            req.busy_s * self.cost.num_gpus * self.cost.dollars_per_gpu_second, labels)

    def request_ended(self, request_id: str, aborted: bool = True) -> None:
        """Call when a request's stream ends, however it ends. One that did not finish (client gone, engine
        failure) is counted as aborted, unless ``aborted=False`` (refused before it started)."""
        with self._lock:
            req = self._reqs.pop(request_id, None)
        if req is not None and aborted:
            self.m["request_aborted"].record(1, self.labels)

    # --- steps
    def on_step(self, step: StepInfo) -> None:
        phase = "prefill" if step.num_prefill_tokens else "decode"
        self.m["step_time_seconds"].record(step.duration_s, self.labels + (phase,))
        for q in step.queue_times.values():
            self.m["request_queue_time_seconds"].record(q, self.labels)
        total = sum(step.tokens.values())
        with self._lock:
            self._pending["gpu_busy_seconds"] += step.duration_s * self.cost.num_gpus
            if total:
                per_token = step.duration_s / total
                for rid, n in step.tokens.items():
                    req = self._reqs.get(rid)
                    if req is not None:  # unknown: not started through us, or already ended
                        req.busy_s += per_token * n

    # --- periodic
    def tick(self, stats: dict[str, Any] | None = None, gpu_memory_used_bytes: float | None = None) -> None:
        """Accrue GPU-seconds and cost up to now, flush token counters, set gauges from ``LLMEngine.stats()``."""
        now = self.clock()
        labels = self.labels
        with self._lock:
            held = max(now - self._last_tick, 0.0) * self.cost.num_gpus
            self._last_tick = now
            pending = dict(self._pending)
            self._pending = {k: type(v)() for k, v in self._pending.items()}
        # Set at every tick: with Ray 2.60 a gauge set once (at start) was gone from its endpoint later on.
        self.m["num_gpus"].record(self.cost.num_gpus, labels)
        self.m["gpu_price_dollars_per_hour"].record(self.cost.price_per_gpu_hour, labels + (self.cost.node_type,))
        self.m["gpu_seconds"].record(held, labels)
        self.m["cost_dollars"].record(held * self.cost.dollars_per_gpu_second, labels)
        for name, value in pending.items():
            self.m[name].record(value, labels)
        if gpu_memory_used_bytes is not None:
            self.m["gpu_memory_used_bytes"].record(gpu_memory_used_bytes, labels)
        if stats is None:
            return
        for key, name in (("num_running", "num_requests_running"), ("num_waiting", "num_requests_waiting"),
                          ("num_swapped", "num_requests_swapped"), ("kv_usage", "kv_cache_usage_perc")):
            if key in stats:
                self.m[name].record(stats[key], labels)
        counters = {"num_preemptions": stats.get("preemptions_recompute", 0) + stats.get("preemptions_swap", 0),
                    "num_swap_out": stats.get("swap_out", 0), "num_swap_in": stats.get("swap_in", 0),
                    **{name: stats[name] for name in PREFIX_CACHE_COUNTERS if name in stats}}
        counters.update({name: stats[key] for key, name in SPEC_DECODE_COUNTERS.items() if key in stats})
        for name, total in counters.items():
            delta = total - self._engine_counters.get(name, 0)
            self._engine_counters[name] = total
            if delta > 0:  # a counter never goes back (an engine without prefix caching reports none of those)
                self.m[name].record(delta, labels)
        for key, total in stats.items():  # spec_proposed_at_<i> / spec_accepted_at_<i>, one series per position
            kind, _, pos = key.rpartition("_at_")
            name = {"spec_proposed": "spec_decode_num_draft_tokens_per_pos",
                    "spec_accepted": "spec_decode_num_accepted_tokens_per_pos"}.get(kind)
            if name is not None:
                delta = total - self._engine_counters.get(key, 0)
                self._engine_counters[key] = total
                if delta > 0:
                    self.m[name].record(delta, labels + (pos,))

    def num_tracked(self) -> int:
        return len(self._reqs)


# ---------------------------------------------------------------------- engine hooks
def observe_steps(engine, on_step: Callable[[StepInfo], None]):
    """Call ``on_step`` after every ``engine.step()`` with what the step scheduled and how long it took, through
    the engine's schedule and step observers. Runs on whichever thread steps the engine."""
    scheduler = engine.scheduler
    seen: set[str] = set()  # requests already scheduled once (their queue time is known)
    last: list[StepInfo] = []

    def note_schedule(sched) -> None:
        tokens: dict[str, int] = {}
        prefill = decode = 0
        queue_times = {}
        for req_id, n in sched.num_scheduled_tokens.items():
            req = scheduler.requests.get(req_id)
            if req is None:
                continue
            rid = req.external_id
            tokens[rid] = tokens.get(rid, 0) + n
            # A decode computes exactly the newest token; anything else (prompt, chunk, recompute) is prefill.
            if n == 1 and req.output_token_ids and req.num_computed_tokens == req.num_tokens - 1:
                decode += 1
            else:
                prefill += n
            if rid not in seen and req.metrics.first_scheduled_time is not None:
                seen.add(rid)
                queue_times[rid] = req.metrics.first_scheduled_time - req.arrival_time
        if len(seen) > 2 * len(scheduler.requests) + 64:  # forget requests that are gone
            seen.intersection_update(r.external_id for r in scheduler.requests.values())
        last.append(StepInfo(0.0, tokens, prefill, decode, queue_times))

    def note_step(duration_s: float) -> None:
        if last:
            info = last.pop()
            last.clear()
            info.duration_s = duration_s
            on_step(info)

    engine.schedule_observers.append(note_schedule)
    engine.step_observers.append(note_step)
    return engine


def gpu_memory_used_bytes(device: str | None) -> float:
    """Memory in use on the device (all processes: total - free), 0 for a CPU device."""
    import torch

    if device is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return float(total - free)


def merge_families(groups: Iterable[list]) -> list:
    """Merge metric families gathered from several processes into one family per name (for one exposition)."""
    from prometheus_client.core import Metric

    merged: dict[str, Metric] = {}
    for families in groups:
        for fam in families:
            into = merged.get(fam.name)
            if into is None:
                into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            into.samples.extend(fam.samples)
    return list(merged.values())
