"""The model-worker deployment: one ``AsyncLLM`` (its paged KV pool and step loop) per replica, as a thin shell.

Tokens travel on *channels*, one long-lived stream per (ingress replica, worker replica) pair, not one stream
per request. Every engine step hands each request's delta to its channel's outbox, and the channel yields
whatever the outbox holds as one Ray item: one item per step per ingress, however many requests it carries.
(A Serve stream per request costs the producer ~270 µs of CPU per item against ~11 µs per request batched on
one stream, measured on the CPU machines; at 100 streams that is more than a core inside the process that
also runs the engine loop.)

Calls, all pinned to this replica by ``PinnedReplicaRouter``:
- ``channel(channel_id)``: opens the stream; its first item is an empty batch (the channel exists). A channel
  with no request for ``channel_idle_s`` ends, so that Serve, which counts open calls, can drain a replica being
  scaled down; the ingress opens a new one when it needs it. When a channel ends because its ingress went
  away, every request it carried is aborted.
- ``submit(work, channel_id)``: starts a request whose deltas go to that channel. Refused (a reason string)
  if this is not the replica the scheduler chose or the channel is unknown, so the ingress can retry.
- ``sync_loras(snapshot)``: the scheduler's LoRA registry changed (``actors/lora_registry.py``); answers with
  the adapters this replica could not load.
- ``abort(request_id)``: the client went away. The engine aborts the request and frees its blocks between two
  steps (``AsyncLLM.abort_request``).
- ``inject_fault(mode)``: tests only, with ``fault_injection: true`` (``actors/faults.py``).

Requests run without a task each: the engine hands every request's delta of a step to ``_deliver`` in one pass
(``AsyncLLM.add_request``), which packs it into its channel's outbox. Only a request whose LoRA adapter must be
loaded first waits in a task for the load.

A background task sends the scheduler heartbeats (pool geometry, engine stats, the request ids held here),
which is how the scheduler learns this replica exists, how loaded it is, and that it is alive. Each heartbeat
also carries what the engine's prefix cache gained and lost since the last one (``kv.drain_cache_events()``,
numbered, folded into a mirror set here: ``prefix_index.CacheReport``), or the whole mirror once when the
scheduler's reply asks for it, so that the scheduler can route a prompt to the replica caching its prefix. The
mirror is this loop's own: the engine's step thread is never read from here. The same loop
ticks the replica's metrics (``engine.metrics.ServingMetrics``: engine gauges, GPU-seconds and cost), which go
to Ray's metrics endpoint and, through ``metrics_families()``, to the ingress's ``/metrics``. Heartbeats also
carry the size of every request held here and the LoRA snapshot this replica follows, from which a restarted
scheduler rebuilds its reservations and its registry.

Health: the engine's ``StepWatchdog`` (``engine/watchdog.py``) judges whether its steps still make progress
(settings: ``worker_health``). The heartbeat loop asks it on every tick; once it says no, this replica fails the
requests it holds with a retryable 503, refuses new ones, reports itself unhealthy (the scheduler routes nothing
more here) and fails ``check_health``, so that Serve replaces it. A step that raises fails the requests in
flight in the engine, also with a retryable 503.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve

from gpt2serve.actors.faults import FaultyEngine
from gpt2serve.actors.lora_registry import LoRASnapshot, WorkerAdapters
from gpt2serve.actors.prefix_index import CacheReport
from gpt2serve.actors.protocol import Refusal, StepItem, WorkerError, WorkRequest, pack_output, retryable
from gpt2serve.engine.async_llm import AsyncLLM
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import InvalidRequestError
from gpt2serve.engine.llm_engine import LLMEngine
from gpt2serve.engine.lora import LoRAError
from gpt2serve.engine.metrics import (CostConfig, FanoutBackend, PrometheusBackend, RayBackend, ServingMetrics,
                                      gpu_memory_used_bytes, observe_steps)
from gpt2serve.engine.outputs import RequestOutput
from gpt2serve.engine.watchdog import StepWatchdog

log = logging.getLogger("ray.serve")
AUTOSCALING_METRIC = "engine_load"
_EARLY_ABORT_TTL_S = 60.0

Batch = list[tuple[str, StepItem | WorkerError]]


class Outbox:
    """One channel's pending items; the channel takes them all at each wake-up."""

    def __init__(self) -> None:
        self.items: Batch = []
        self.wakeup = asyncio.Event()
        self.requests: set[str] = set()

    def put(self, request_id: str, item: StepItem | WorkerError) -> None:
        self.items.append((request_id, item))
        self.wakeup.set()


@dataclass(eq=False)
class Running:
    """A request held by this replica, from ``submit`` until its last delta, its failure or its abort."""

    work: WorkRequest
    box: Outbox
    in_engine: bool = False  # handed to the engine (else still loading its adapter)
    holds_adapter: bool = False  # holds a load of work.lora, released when it ends
    loading: asyncio.Task | None = None


class ModelWorker:
    def __init__(self, engine_config: dict[str, Any], scheduler, heartbeat_interval_s: float = 0.5,
                 channel_idle_s: float = 10.0, telemetry: dict[str, Any] | None = None,
                 gil_switch_interval_s: float | None = None, worker_health: dict[str, Any] | None = None,
                 fault_injection: bool = False):
        started = time.monotonic()  # the replica pays for its GPUs from here, model loading included
        if gil_switch_interval_s is not None:
            # The step thread and this process's event loops share the GIL: a thread that wants it waits up to
            # this long for the holder to give it up (Python's default 5 ms is a whole decode step).
            sys.setswitchinterval(gil_switch_interval_s)
        engine = LLMEngine(EngineConfig(**engine_config))
        self.llm = AsyncLLM(FaultyEngine(engine) if fault_injection else engine, StepWatchdog(**(worker_health or {})))
        self.unhealthy: str | None = None  # why this replica stopped serving (it waits to be replaced)
        self.scheduler = scheduler
        self.heartbeat_interval_s = heartbeat_interval_s
        self.channel_idle_s = channel_idle_s
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()
        self._init_metrics(telemetry or {}, started)
        self.outboxes: dict[str, Outbox] = {}
        self.running: dict[str, Running] = {}
        self.early_aborts: dict[str, float] = {}  # aborts that overtook their submit
        self.counters: Counter[str] = Counter()
        self.global_queue_share = 0.0  # this worker's share of the scheduler's queue, from heartbeat replies
        self.cache_report = CacheReport()
        self.adapters = WorkerAdapters(self.llm)
        self._lora_task: asyncio.Task | None = None
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def _require_pinned(self, call: str, replica: str | None) -> None:
        """Fail a pinned call that reached another replica than the one it names (its state lives there)."""
        if replica is not None and replica != self.replica_id:
            raise RuntimeError(f"{call} for replica {replica} reached {self.replica_id}")

    # ------------------------------------------------------------------ streaming
    async def channel(self, channel_id: str, replica: str | None = None) -> AsyncIterator[Batch]:
        self._require_pinned("channel", replica)
        box = self.outboxes[channel_id] = Outbox()
        try:
            yield []  # the channel exists: submits naming it may follow
            while True:
                try:
                    await asyncio.wait_for(box.wakeup.wait(), self.channel_idle_s)
                except asyncio.TimeoutError:
                    if not box.requests and not box.items:
                        return
                    continue
                box.wakeup.clear()
                batch, box.items = box.items, []
                yield batch
        finally:  # the ingress is gone (or closed the channel): nobody will read these requests' tokens
            del self.outboxes[channel_id]
            for request_id in list(box.requests):
                self._cancel(request_id)

    async def submit(self, work: WorkRequest, channel_id: str, replica: str | None = None) -> Refusal | None:
        """Start ``work``; None when started, else why not (the ingress then asks the scheduler again)."""
        if replica is not None and replica != self.replica_id:
            self.counters["misrouted"] += 1
            return Refusal(f"replica {replica} is gone (the call reached {self.replica_id})", worker_gone=True)
        if self._check_engine() is not None:
            return Refusal(f"replica {self.replica_id} is unhealthy ({self.unhealthy})", worker_gone=True)
        box = self.outboxes.get(channel_id)
        if box is None:  # it closed for idleness just as this request was sent
            return Refusal(f"no channel {channel_id} on replica {self.replica_id}", worker_gone=False)
        if self.early_aborts.pop(work.request_id, None) is not None:
            self.counters["cancelled"] += 1
            return None  # its client left before it started
        run = self.running[work.request_id] = Running(work, box)
        box.requests.add(work.request_id)
        self.counters["started"] += 1
        self.metrics.request_started(work.request_id)
        if work.lora is None:
            self._start(run, None)
        else:  # usually held already; else loaded now (see actors/lora_registry.py)
            run.loading = asyncio.get_running_loop().create_task(self._load_then_start(run))
        return None

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        if not self._cancel(request_id):
            now = time.monotonic()
            self.early_aborts = {k: t for k, t in self.early_aborts.items() if now - t < _EARLY_ABORT_TTL_S}
            self.early_aborts[request_id] = now

    async def _load_then_start(self, run: Running) -> None:
        try:
            lora_name = await self.adapters.acquire(run.work.lora)
        except LoRAError as e:
            self._end(run, WorkerError(str(e), "model", 400), invalid=True)
            return
        except Exception as e:  # noqa: BLE001 - e.g. the adapter's files vanished: this request fails, not the worker
            log.exception("loading the adapter of request %s failed", run.work.request_id)
            self._end(run, WorkerError(f"loading the adapter failed: {e!r}", "model", 500))
            return
        run.holds_adapter = True
        self._start(run, lora_name)

    def _start(self, run: Running, lora_name: str | None) -> None:
        work = run.work
        try:
            self.llm.add_request(work.request_id, work.prompt_token_ids, work.params,
                                 lambda out: self._deliver(run, out), work.priority, lora_name)
        except (InvalidRequestError, LoRAError) as e:  # nothing was allocated
            self._end(run, WorkerError(str(e), getattr(e, "param", "model"), 400), invalid=True)
            return
        except Exception as e:  # noqa: BLE001 - a bug building the request: this request fails, not the replica
            log.exception("request %s could not be started", work.request_id)
            self._end(run, WorkerError(f"the engine failed this request: {e!r}", None, 500))
            return
        run.in_engine = True

    def _deliver(self, run: Running, out: RequestOutput | BaseException) -> None:
        """One step's delta of ``run`` (or the exception that failed it), on the event loop, after the step."""
        if isinstance(out, BaseException):  # an engine step failed; the engine already dropped the request
            log.error("request %s failed in the engine: %r", run.work.request_id, out)
            self._end(run, retryable(f"the model worker failed a step ({out})"))
            return
        self.metrics.on_output(out)
        run.box.put(run.work.request_id, pack_output(out))
        if out.finished:
            self._end(run)

    def _cancel(self, request_id: str) -> bool:
        run = self.running.get(request_id)
        if run is None:
            return False
        if run.loading is not None:
            run.loading.cancel()
        if run.in_engine:
            self.llm.abort_request(request_id)  # its blocks are freed between two steps
        self._end(run, cancelled=True)
        return True

    def _end(self, run: Running, error: WorkerError | None = None, invalid: bool = False,
             cancelled: bool = False) -> None:
        request_id = run.work.request_id
        if self.running.get(request_id) is not run:
            return
        del self.running[request_id]
        if error is not None:
            run.box.put(request_id, error)
        if run.holds_adapter:
            self.adapters.release(run.work.lora)
        run.box.requests.discard(request_id)
        if invalid:
            self.counters["invalid"] += 1
        self.counters["cancelled" if cancelled else "finished"] += 1
        self.metrics.request_ended(request_id, aborted=not invalid)  # no-op if it finished

    # ------------------------------------------------------------------ LoRA adapters
    async def sync_loras(self, snapshot: LoRASnapshot, replica: str | None = None) -> dict[str, str]:
        """Hold the adapters ``snapshot`` names (call pinned); {name: why not} for those that failed to load."""
        self._require_pinned("sync_loras", replica)
        return await self.adapters.sync(snapshot)

    def _lora_housekeeping(self, snapshot: LoRASnapshot | None) -> None:
        """From a heartbeat reply: catch up with a registry version this replica missed, or drop loads that the
        last requests using them have now released. In the background: loading reads files."""
        if self._lora_task is not None and not self._lora_task.done():
            return  # the next heartbeat asks again
        if snapshot is not None:
            self._lora_task = asyncio.get_running_loop().create_task(self.adapters.sync(snapshot))
        elif self.adapters.has_unwanted():
            self._lora_task = asyncio.get_running_loop().create_task(self.adapters.sweep())

    # ------------------------------------------------------------------ metrics
    def _init_metrics(self, telemetry: dict[str, Any], started: float) -> None:
        device = self.llm.engine.runner.device
        self.device = str(device)
        device_name = None
        if self.device.startswith("cuda"):
            import torch

            device_name = torch.cuda.get_device_name(device)
        cost = CostConfig(**telemetry.get("cost", {})).resolve(device_name, telemetry.get("actor_num_gpus", 0.0))
        self.prometheus = PrometheusBackend()
        self.metrics = ServingMetrics(FanoutBackend(self.prometheus, RayBackend()),
                                      telemetry.get("model_name", self.llm.engine.config.model), self.replica_id,
                                      cost, started_at=started)
        observe_steps(self.llm.engine, self.metrics.on_step)
        log.info("worker %s: %s GPU(s) of node type %r at $%.4f per GPU-hour", self.replica_id, cost.num_gpus,
                 cost.node_type, cost.price_per_gpu_hour)

    def _tick_metrics(self) -> None:
        self.metrics.tick(self.llm.stats(), gpu_memory_used_bytes(self.device))

    async def metrics_families(self, replica: str | None = None) -> list:
        """This replica's metric families, up to date, for the ingress's ``/metrics`` (call pinned)."""
        if replica is not None and replica != self.replica_id:
            return []  # the call reached another replica: that one's metrics come from its own call
        self._tick_metrics()
        return self.prometheus.families()

    # ------------------------------------------------------------------ status
    def info(self) -> dict[str, Any]:
        engine = self.llm.engine
        return {
            **self.llm.stats(),
            "worker_id": self.replica_id, "actor_name": self.actor_name,
            "block_size": engine.config.block_size, "max_num_seqs": engine.config.max_num_seqs,
            "max_model_len": engine.max_model_len, "num_channels": len(self.outboxes),
            "requests_started": self.counters["started"], "requests_finished": self.counters["finished"],
            "requests_cancelled": self.counters["cancelled"], "requests_invalid": self.counters["invalid"],
            "requests_misrouted": self.counters["misrouted"],
            "active_request_ids": sorted(self.running), "unhealthy": self.unhealthy,
            **self.adapters.info(),
        }

    def _cache_fields(self) -> dict[str, Any]:
        """The prefix-cache part of a heartbeat: events since the last one, or the whole mirror when due."""
        drain = getattr(self.llm.engine.kv, "drain_cache_events", None)
        if drain is None:  # an engine without prefix caching: nothing to report
            return {}
        return self.cache_report.next(drain())

    async def stats(self, replica: str | None = None) -> dict[str, Any]:
        """This replica's engine stats and counters (call pinned: ``worker.stats.remote(replica=id)``)."""
        return self.info()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve counts ongoing calls, which here are a few long-lived channels; scale on requests instead:
        # those this worker holds plus its share of the ones waiting for any worker in the global queue.
        return {AUTOSCALING_METRIC: len(self.running) + self.global_queue_share}

    async def check_health(self) -> None:
        # Raising makes Serve replace the replica (after a few failed checks in a row).
        if self._check_engine() is not None:
            raise RuntimeError(f"replica {self.replica_id} is unhealthy: {self.unhealthy}")

    def _check_engine(self) -> str | None:
        """Ask the engine's watchdog; the first time it says the engine is unhealthy, fail every request held
        here with a retryable error (the engine may never give them another token) and stop serving."""
        if self.unhealthy is None and (reason := self.llm.unhealthy()) is not None:
            self.unhealthy = reason
            log.error("worker %s is unhealthy, failing its %d request(s) and waiting to be replaced: %s",
                      self.replica_id, len(self.running), reason)
            for request_id in list(self.running):
                run = self.running[request_id]
                if run.loading is not None:
                    run.loading.cancel()
                if run.in_engine:
                    self.llm.abort_request(request_id)  # nothing more reaches it, whether or not the step returns
                self._end(run, retryable(f"the model worker became unhealthy ({reason})"))
        return self.unhealthy

    async def inject_fault(self, mode: str | None, replica: str | None = None) -> None:
        """Tests only: make this replica's engine steps raise or hang (``actors/faults.py``)."""
        self._require_pinned("inject_fault", replica)
        engine = self.llm.engine
        if not isinstance(engine, FaultyEngine):  # noqa: TRY004 - a switch that is off, not a bad argument
            raise RuntimeError("fault injection is off on this service (fault_injection: true turns it on)")
        engine.inject(mode)

    def _held_requests(self) -> dict[str, list[int]]:
        """Request id -> [prompt tokens, max new tokens per sequence, n]: what a restarted scheduler reserves for
        the requests running here (``admission.Dispatcher._adopt``)."""
        held = {}
        for rid, run in self.running.items():
            prompt, params = len(run.work.prompt_token_ids), run.work.params
            # No max_tokens (chat): up to the context, as the ingress asked admission for.
            held[rid] = [prompt, params.max_tokens or self.llm.engine.max_model_len - prompt, params.n]
        return held

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                self._tick_metrics()
            except Exception as e:  # noqa: BLE001 - metrics must never stop the heartbeat
                log.warning("metrics tick failed: %r", e)
            try:
                # Bounded: a call to a deployment with no replica (scheduler restarting) would wait forever.
                self._check_engine()
                info = {**self.info(), **self._cache_fields(), **self.adapters.report(),
                        "held_requests": self._held_requests()}
                reply = await asyncio.wait_for(self.scheduler.heartbeat.remote(self.replica_id, info),
                                               max(5.0, 4 * self.heartbeat_interval_s))
                self.global_queue_share = reply["num_waiting"] / max(reply["num_workers"], 1)
                if reply.get("send_cache_snapshot"):  # the scheduler's record has a gap (restart, lost report)
                    self.cache_report.snapshot_due = True
                self._lora_housekeeping(reply.get("loras"))
            except Exception as e:  # noqa: BLE001 - the scheduler may be starting or restarting; keep trying
                log.warning("heartbeat to the scheduler failed: %r", e)
            await asyncio.sleep(self.heartbeat_interval_s)

    async def __del__(self) -> None:
        # Serve calls this on graceful shutdown, after draining. Stop heartbeating so the scheduler forgets us.
        self._heartbeat_task.cancel()
        try:  # bounded: when the whole application is deleted, the scheduler may already be gone
            await asyncio.wait_for(self.scheduler.remove_worker.remote(self.replica_id), 2.0)
        except Exception:  # noqa: BLE001 - best effort; the heartbeat timeout covers it
            pass
