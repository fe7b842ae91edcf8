"""The scheduler deployment: admission and routing, as a thin shell around ``admission.Dispatcher``.

The ingress calls ``admit`` once per request and gets back the worker replica to stream from (or a refusal);
``release`` when the request is over. Both are control messages: no token passes through here, so nothing a
decode step waits for does either. ``admit`` blocks while the request waits in the global queue; if the caller
is cancelled (client gone), the request leaves the queue.

Workers announce themselves by heartbeat, which also carries what their prefix caches gained and lost since the
last one (``actors/prefix_index.py``); the reply asks a worker for its whole set once when that record has a gap.
LoRA adapters (``actors/lora_registry.py``): the registry of what requests may name lives here; ``admit`` resolves
a request's adapter (404 if none), and ``load_lora`` / ``unload_lora`` change the registry and broadcast it to
every worker, which heartbeats then repeat to any worker still behind.

After a restart (Serve replaces a scheduler replica that died), this replica rebuilds what it can from the
workers' heartbeats: the requests each worker holds and their reservations (``Dispatcher._adopt``), what their
prefix caches hold (a snapshot, asked for on the numbering gap), and the LoRA registry with its version
(``LoRARegistry.adopt``). Until every routed worker has been heard from, a request naming an adapter this
replica does not know yet waits for that rather than getting a 404. The global queue itself is lost: its
requests' ``admit`` calls fail, and their ingresses answer them 503 + Retry-After.

Workers are routed to only while Serve's controller routes to them too:
this process holds a handle to the worker deployment whose ``PinnedReplicaRouter`` reports the controller's
replica set. A replica being scaled down leaves that set before it drains, and so stops getting new requests
while it finishes the ones it has.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from gpt2serve.actors.admission import Dispatcher, Placement, QueueFullError, RequestTooLargeError
from gpt2serve.actors.lora_registry import LoRARegistry, LoRASnapshot
from gpt2serve.actors.metrics import REJECTIONS, SCHEDULER_REPLICA
from gpt2serve.actors.protocol import Admission, QueuedRequest
from gpt2serve.actors.replica_events import watch_replicas
from gpt2serve.actors.routing import ROUTING_POLICIES
from gpt2serve.actors.settings import ServiceConfig
from gpt2serve.actors.streams import detached
from gpt2serve.engine.lora import LoRAError, UnknownLoRAError
from gpt2serve.engine.metrics import SCHEDULER_METRICS, RayBackend
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES

log = logging.getLogger("ray.serve")


class Scheduler:
    def __init__(self, config: dict[str, Any], worker_deployment: str = "ModelWorker"):
        cfg = ServiceConfig(**config)
        self.core = Dispatcher(
            SCHEDULING_POLICIES.build(cfg.engine.scheduling_policy, **cfg.engine.scheduling_policy_args),
            ROUTING_POLICIES.build(cfg.routing_policy, **cfg.routing_policy_args),
            max_queued_requests=cfg.max_queued_requests, max_inflight_per_worker=cfg.max_inflight_per_worker,
            kv_overcommit=cfg.kv_overcommit, worker_timeout_s=cfg.worker_timeout_s, lease_grace_s=cfg.lease_grace_s,
            min_retry_after_s=cfg.min_retry_after_s, reserve_output=cfg.kv_reserve_output,
            queue_timeout_s=cfg.queue_timeout_s,
        )
        self.waiters: dict[str, asyncio.Future] = {}  # request id -> its worker id, or the Admission refusing it
        self.enable_lora = cfg.engine.enable_lora
        self.loras = LoRARegistry(cfg.engine.lora_modules, {cfg.model_name, cfg.engine.model})
        self._lora_lock = asyncio.Lock()
        # Rejections, queue length and routing decisions on Ray's metrics endpoint (the ingress's /metrics reads
        # snapshot()). Decisions are counted by the routing policy and flushed from the expiry loop.
        self._rejected = RayBackend().make(SCHEDULER_METRICS["request_rejected"])
        self._queue_length = RayBackend().make(SCHEDULER_METRICS["scheduler_queue_length"])
        self._decisions = RayBackend().make(SCHEDULER_METRICS["router_decisions"])
        self._decisions_flushed: dict[str, int] = {}
        self._labels = (cfg.model_name, SCHEDULER_REPLICA)
        self._loop = asyncio.get_running_loop()
        self._rebuilt = asyncio.Event()  # every routed worker has been heard from since this replica started
        self._heard_from: set[str] = set()
        self._rebuild_wait_s = cfg.worker_timeout_s
        self._expiry_task = self._loop.create_task(self._expire_loop(cfg.heartbeat_interval_s))
        self.worker_deployment = (serve.get_replica_context().app_name, worker_deployment)
        watch_replicas(self._on_replicas)
        # A handle's router starts following the controller's replica set when the handle is initialised.
        self._workers = serve.get_deployment_handle(worker_deployment, self.worker_deployment[0])
        self._workers._init()

    async def admit(self, req: QueuedRequest) -> Admission:
        lora = None
        if req.lora_name is not None:
            try:
                lora = await self._resolve_lora(req.lora_name)
            except UnknownLoRAError as e:
                return Admission(None, 404, str(e))
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[req.request_id] = waiter
        try:
            try:
                self._wake(self.core.submit(req))
            except QueueFullError as e:
                self._rejected.record(1, self._labels + (REJECTIONS["rejected_queue_full"],))
                return Admission(None, 429, str(e), e.retry_after_s)
            except RequestTooLargeError as e:
                self._rejected.record(1, self._labels + (REJECTIONS["rejected_too_large"],))
                return Admission(None, 400, str(e))
            verdict = await waiter  # a worker id, or the refusal of a request that waited too long
            return verdict if isinstance(verdict, Admission) else Admission(verdict, lora=lora)
        except asyncio.CancelledError:
            # Routed or not, the request is over: cancel() drops it from the queue or releases its reservation.
            self._wake(self.core.cancel(req.request_id))
            raise
        finally:
            self.waiters.pop(req.request_id, None)

    # The methods below are `async def` on purpose: Serve runs a deployment's plain `def` methods on a thread pool,
    # where they would mutate the dispatcher (and resolve admit's futures) while `admit` runs on the event loop
    # (seen at 100 users: "deque mutated during iteration").
    async def release(self, request_id: str, worker_failed: bool = False,
                      output_tokens_per_seq: int | None = None) -> None:
        self._wake(self.core.release(request_id, worker_failed, output_tokens_per_seq))

    async def _resolve_lora(self, name: str):
        """The registry's load for ``name``; right after a restart, a name not known yet waits (up to
        ``worker_timeout_s``) until every routed worker's heartbeat has had its say (``LoRARegistry.adopt``)."""
        try:
            return self.loras.resolve(name)
        except UnknownLoRAError:
            if self._rebuilt.is_set():
                raise
        try:
            await asyncio.wait_for(self._rebuilt.wait(), self._rebuild_wait_s)
        except asyncio.TimeoutError:
            pass
        return self.loras.resolve(name)

    async def heartbeat(self, worker_id: str, info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        self.loras.adopt(info.get("lora_version", 0), info.pop("lora_adapters", None))
        self._heard_from.add(worker_id)
        self._check_rebuilt()
        self._wake(self.core.heartbeat(worker_id, info))
        reply = {"num_waiting": len(self.core.waiting), "num_workers": len(self.core.workers),
                 "send_cache_snapshot": self.core.needs_cache_snapshot(worker_id)}
        if info.get("lora_version", self.loras.version) < self.loras.version:
            reply["loras"] = self.loras.snapshot()
        return reply

    # ------------------------------------------------------------------ LoRA adapters (docs/lora.md)
    async def list_loras(self) -> dict[str, Any]:
        return {"adapters": list(self.loras.adapters.values()), "merged": self.loras.merged}

    async def load_lora(self, name: str, path: str) -> tuple[int, str]:
        """Load an adapter on every worker, then let requests name it: (HTTP status, message)."""
        if not self.enable_lora:
            return 400, "LoRA is not enabled on this service (engine.enable_lora: true)"
        async with self._lora_lock:
            try:
                proposal = self.loras.propose(name, path)
            except LoRAError as e:
                return 400, str(e)
            errors = await self._broadcast_loras(proposal, checking=name)
            if not errors:
                ref = self.loras.commit()
                log.info("LoRA adapter %r loaded from %s as %s on %d worker(s)", name, path, ref.uid,
                         len(self.core.workers))
                return 200, f"Success: LoRA adapter '{name}' added successfully."
            await self._broadcast_loras(self.loras.abandon())
            return errors[0][0], errors[0][1]

    async def unload_lora(self, name: str) -> tuple[int, str]:
        """Stop admitting requests for ``name`` and tell the workers; requests already admitted finish with it."""
        async with self._lora_lock:
            try:
                snapshot = self.loras.remove(name)
            except UnknownLoRAError as e:
                return 404, str(e)
            except LoRAError as e:
                return 400, str(e)
            for status, message in await self._broadcast_loras(snapshot):
                log.warning("unloading LoRA adapter %r: %s (the worker drops it on a later heartbeat)", name, message)
            return 200, f"Success: LoRA adapter '{name}' removed successfully."

    async def _broadcast_loras(self, snapshot: LoRASnapshot, checking: str | None = None) -> list[tuple[int, str]]:
        """Send ``snapshot`` to every worker; the (status, message) of each that failed to load ``checking``
        (400: the adapter itself is bad) or did not answer (503), 400s first. No worker at all is a 503: nothing
        could check the adapter."""
        workers = sorted(self.core.workers)
        if not workers:
            return [(503, "no model worker is up to load the adapter on; retry")]

        async def send(worker_id: str) -> tuple[int, str] | None:
            try:
                # Detached: concurrent pinned calls made in one request's context can swap replicas.
                errors = await asyncio.wait_for(
                    detached(lambda: self._workers.sync_loras.remote(snapshot, replica=worker_id)), 120.0)
            except Exception as e:  # noqa: BLE001 - a worker that died or hung: its replacement syncs by heartbeat
                return 503, f"worker {worker_id} did not answer ({e!r}); retry"
            return (400, errors[checking]) if checking in errors else None

        failed = [r for r in await asyncio.gather(*(send(w) for w in workers)) if r is not None]
        return sorted(failed)

    async def remove_worker(self, worker_id: str) -> None:
        self.core.remove_worker(worker_id)

    async def snapshot(self) -> dict[str, Any]:
        return self.core.snapshot()

    def _flush_decisions(self) -> None:
        for reason, total in self.core.routing.decisions.items():
            delta = total - self._decisions_flushed.get(reason, 0)
            if delta:
                self._decisions.record(delta, self._labels + (reason,))
                self._decisions_flushed[reason] = total

    def _on_replicas(self, app: str, deployment: str, replica_ids: set[str]) -> None:
        # Called on the router's event loop, which may be another thread: hop onto ours.
        if (app, deployment) == self.worker_deployment:
            def apply() -> None:
                self._wake(self.core.set_routable(replica_ids))
                self._check_rebuilt()

            self._loop.call_soon_threadsafe(apply)

    def _check_rebuilt(self) -> None:
        routable = self.core.routable
        if not self._rebuilt.is_set() and routable is not None and routable <= self._heard_from:
            self._rebuilt.set()

    def _wake(self, placed: list[Placement]) -> None:
        for req, worker_id in placed:
            self._answer(req.request_id, worker_id)

    def _answer(self, request_id: str, verdict: str | Admission) -> None:
        waiter = self.waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(verdict)

    async def _expire_loop(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._queue_length.record(len(self.core.waiting), self._labels)
            self._flush_decisions()
            for worker_id in self.core.expire():
                log.warning("worker %s missed its heartbeats: no longer routing to it", worker_id)
            expired = self.core.expire_waiting()
            for req in expired:
                self._rejected.record(1, self._labels + (REJECTIONS["rejected_queue_timeout"],))
                self._answer(req.request_id, Admission(
                    None, 503, f"no worker could take the request within queue_timeout_s "
                    f"({self.core.queue_timeout_s:g} s); retry later", self.core.retry_after_s()))
            if expired:  # the queue's head may have been what held the rest back
                self._wake(self.core.dispatch())
