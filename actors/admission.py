"""The scheduler deployment's logic, without Ray: a global waiting queue, admission, and worker bookkeeping.

A request is *admitted* to a worker only when the worker has room to run it at once: a sequence slot
(``max_inflight`` of them, by default the engine's ``max_num_seqs``) and KV blocks for its prompt and the
output it will probably write, times ``n``. "Probably" is ``OutputLengths``: the mean (or a chosen quantile) of
how long the service's recent requests really ran (most stop at EOS or a stop string, or their client leaves,
long before ``max_tokens``, and a chat request's ``max_tokens`` defaults to the whole context), never more than
the request's own ``max_tokens``. A request that outgrows its reservation still runs: the engine preempts when
its pool is short. ``reserve_output="max_tokens"`` reserves the whole ``max_tokens`` (no preemption is ever
needed, at the price of far fewer requests at once). Until then it waits here, in one queue for the whole service, ordered by
the configured scheduling policy, so that priorities hold across workers instead of inside each one. Past
``max_queued_requests`` waiting, a new request is refused (HTTP 429) rather than queued without bound.

Reservations are the scheduler's own accounting and change the moment it routes or releases a request, so
back-to-back decisions see each other. Workers' heartbeats add what only they know (free blocks, running and
waiting counts, which requests they really hold, which block hashes their prefix caches gained or lost: each
worker's ``PrefixIndex``) and prove they are alive; a worker silent for
``worker_timeout_s`` is dropped, and a reservation its worker does not report for ``lease_grace_s`` is
released (its ingress died before saying so). A worker that reports itself unhealthy (``engine/watchdog.py``)
keeps its reservations but gets no new request. A request that waits longer than ``queue_timeout_s`` leaves
the queue (``expire_waiting``), and its caller answers it 503 with Retry-After.

State after a restart: this object lives in one process, and a new scheduler replica starts with nothing. It
learns the workers again from their heartbeats, and on a worker's first heartbeat *adopts* the requests that
worker reports holding (``held_requests``: their sizes), reserving for them as if it had routed them itself, so
that it does not over-admit while they run. An adopted reservation ends with its ingress's ``release`` (which
reaches the new replica), or at the first heartbeat that no longer lists it. (Prefix caches resync on their
own: the new ``PrefixIndex`` sees a numbering gap and asks for a snapshot.)

Every method returns the requests it placed, so the caller (the Serve shell) can wake their waiters.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from typing import Any, Callable

from gpt2serve.actors.protocol import QueuedRequest
from gpt2serve.actors.routing import RoutingPolicy
from gpt2serve.actors.worker_state import Reservation, WorkerState
from gpt2serve.policies.scheduling import SchedulingPolicy

Placement = tuple[QueuedRequest, str]  # (request, worker id)


class QueueFullError(Exception):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(Exception):
    """No worker could ever hold this request, even idle: queueing it would block the queue forever."""


class OutputLengths:
    """How many tokens per sequence the service's recent requests wrote before they ended (any way but a worker
    failure), and the statistic of that which admission reserves KV for: ``"mean"``, or a quantile ``"p95"``.
    Until ``min_samples`` requests have ended there is no estimate, and requests reserve their whole
    ``max_tokens``.

    Why the mean is the default: the pool holds the requests *in flight*, each part-way through its output. Over
    many requests, reserving the mean output length leaves room for what they use at any moment (on average, a
    request in flight has written about E[L²] / 2E[L] tokens, less than E[L] unless lengths vary wildly), and the
    engine preempts in the rare step where it is short. A high quantile reserves nearly max_tokens for lengths
    spread evenly below it, and gains little."""

    def __init__(self, statistic: str = "mean", window: int = 512, min_samples: int = 32):
        if statistic != "mean" and not re.fullmatch(r"p(\d{1,2}(\.\d+)?|100)", statistic):
            raise ValueError(f"unknown reservation statistic {statistic!r}: 'mean' or a quantile such as 'p95'")
        self.statistic = statistic
        self.min_samples = min_samples
        self.recent: deque[int] = deque(maxlen=window)
        self._estimate: int | None = None

    def observe(self, tokens_per_seq: int) -> None:
        self.recent.append(tokens_per_seq)
        self._estimate = None  # recomputed on demand

    def estimate(self) -> int | None:
        if len(self.recent) < self.min_samples:
            return None
        if self._estimate is None:
            if self.statistic == "mean":
                self._estimate = math.ceil(sum(self.recent) / len(self.recent))
            else:
                ordered = sorted(self.recent)
                q = float(self.statistic[1:]) / 100
                self._estimate = ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]
        return self._estimate

    def reserve_for(self, max_new_tokens: int) -> int:
        estimate = self.estimate()
        return max_new_tokens if estimate is None else max(1, min(max_new_tokens, estimate))


class Dispatcher:
    def __init__(self, policy: SchedulingPolicy, routing: RoutingPolicy, *, max_queued_requests: int,
                 max_inflight_per_worker: int | None = None, kv_overcommit: float = 1.0,
                 worker_timeout_s: float = 10.0, lease_grace_s: float = 30.0, min_retry_after_s: float = 1.0,
                 reserve_output: str = "max_tokens", queue_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.routing = routing
        self.max_queued_requests = max_queued_requests
        self.max_inflight_per_worker = max_inflight_per_worker
        self.kv_overcommit = kv_overcommit
        self.output_lengths = OutputLengths(reserve_output) if reserve_output != "max_tokens" else None
        self.worker_timeout_s = worker_timeout_s
        self.lease_grace_s = lease_grace_s
        self.min_retry_after_s = min_retry_after_s
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self.waiting: list[QueuedRequest] = []
        self.workers: dict[str, WorkerState] = {}
        self.routable: set[str] | None = None  # Serve's own replica set, once known: only these get new requests
        self.assigned: dict[str, str] = {}  # request id -> worker id
        self._releases: deque[float] = deque(maxlen=4096)  # when requests finished, for Retry-After
        self.counters = {"admitted": 0, "rejected_queue_full": 0, "rejected_too_large": 0, "rejected_queue_timeout": 0,
                         "cancelled_waiting": 0, "workers_lost": 0, "leases_expired": 0, "adopted": 0}

    # ------------------------------------------------------------------ requests
    def submit(self, req: QueuedRequest) -> list[Placement]:
        """Queue ``req`` and route what can be routed; raises QueueFullError / RequestTooLargeError."""
        if self.workers and not any(w.could_ever_fit(req, self.kv_overcommit) for w in self.workers.values()):
            self.counters["rejected_too_large"] += 1
            raise RequestTooLargeError(
                f"the request needs {req.n} sequence(s) of up to {req.num_prompt_tokens + req.max_new_tokens} "
                "tokens, more than any worker can hold at once; lower max_tokens or n")
        self._estimate_output(req)
        req.queued_at = self.clock()
        self.waiting.append(req)
        placed = self.dispatch()
        if req.request_id not in self.assigned and len(self.waiting) > self.max_queued_requests:
            self.waiting.remove(req)
            self.counters["rejected_queue_full"] += 1
            raise QueueFullError(
                f"the service is at capacity: {len(self.waiting)} requests are already waiting "
                f"(max_queued_requests={self.max_queued_requests}); retry later", self.retry_after_s())
        return placed

    def dispatch(self) -> list[Placement]:
        """Route waiting requests in policy order; stop at the first that fits no worker.

        Stopping there (rather than letting smaller requests slip past) keeps the policy's promise, as the
        engine's scheduler does.
        """
        if not self.waiting or not self.workers:
            return []
        now = self.clock()
        order = self.waiting if len(self.waiting) == 1 else self.policy.order(self.waiting, now)
        placed: list[Placement] = []
        candidates = [w for w in self.workers.values()
                      if w.unhealthy is None and (self.routable is None or w.worker_id in self.routable)]
        for req in order:
            fits = [w for w in candidates if w.fits(req, self.kv_overcommit)]
            worker = self.routing.choose(req, fits, now) if fits else None
            if worker is None:
                break
            self.routing.routed(req, worker, now)
            self._reserve(req, worker, now)
            placed.append((req, worker.worker_id))
        if placed:
            done = {r.request_id for r, _ in placed}
            self.waiting = [r for r in self.waiting if r.request_id not in done]
            self.counters["admitted"] += len(placed)
        return placed

    def _estimate_output(self, req: QueuedRequest) -> None:
        if self.output_lengths is not None:
            req.reserve_new_tokens = self.output_lengths.reserve_for(req.max_new_tokens)

    def _reserve(self, req: QueuedRequest, worker: WorkerState, now: float, adopted: bool = False) -> None:
        worker.inflight[req.request_id] = Reservation(
            req.num_prompt_tokens + req.reserved_new_tokens * req.n, worker.blocks_for(req), req.n, now, adopted)
        self.assigned[req.request_id] = worker.worker_id

    def expire_waiting(self) -> list[QueuedRequest]:
        """Take the requests that waited longer than ``queue_timeout_s`` out of the queue; the caller refuses them
        (HTTP 503 + Retry-After): a request starved that long is better retried later, or elsewhere."""
        if self.queue_timeout_s is None or not self.waiting:
            return []
        now = self.clock()
        expired = [r for r in self.waiting if now - r.queued_at > self.queue_timeout_s]
        if expired:
            self.waiting = [r for r in self.waiting if now - r.queued_at <= self.queue_timeout_s]
            self.counters["rejected_queue_timeout"] += len(expired)
        return expired

    def cancel(self, request_id: str) -> list[Placement]:
        """The client went away: forget the request wherever it is."""
        for i, req in enumerate(self.waiting):
            if req.request_id == request_id:
                del self.waiting[i]
                self.counters["cancelled_waiting"] += 1
                return []
        return self.release(request_id)

    def release(self, request_id: str, worker_failed: bool = False,
                output_tokens_per_seq: int | None = None) -> list[Placement]:
        """The request is over (finished, failed or cancelled): give its room back and route the next.
        ``output_tokens_per_seq``: how far it got, for the reservation estimate (None: unknown, or no token)."""
        worker_id = self.assigned.pop(request_id, None)
        if worker_id is None:
            return []
        if self.output_lengths is not None and output_tokens_per_seq and not worker_failed:
            self.output_lengths.observe(output_tokens_per_seq)
        self._releases.append(self.clock())
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.inflight.pop(request_id, None)
            if worker_failed:  # the ingress saw the replica die: stop routing to it before its heartbeat lapses
                self.remove_worker(worker_id)
        return self.dispatch()

    # ------------------------------------------------------------------ workers
    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> list[Placement]:
        """A worker says it is alive: its pool geometry, engine stats, the request ids it holds, and a numbered
        report of its prefix cache (``cache_seq`` with ``cache_events`` or ``cache_snapshot``)."""
        now = self.clock()
        info = dict(info)
        seq, events, snapshot = info.pop("cache_seq", None), info.pop("cache_events", None), info.pop(
            "cache_snapshot", None)
        held = info.pop("held_requests", None) or {}
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerState(
                worker_id, info["block_size"], info["num_total_blocks"],
                self.max_inflight_per_worker or info["max_num_seqs"], now)
            self._adopt(worker, held, now)
        worker.last_seen = now
        worker.num_total_blocks = info["num_total_blocks"]
        worker.free_blocks = info.get("num_free_blocks", worker.num_total_blocks)
        worker.unhealthy = info.get("unhealthy")
        worker.stats = info
        if seq is not None:
            worker.prefix_index.report(seq, events, snapshot)
        worker.prefix_index.expire(now)
        active = set(info.get("active_request_ids", ()))
        for rid, res in list(worker.inflight.items()):
            # An adopted request was running when first reported: once unreported, it is over.
            if rid not in active and (res.adopted or now - res.routed_at > self.lease_grace_s):
                del worker.inflight[rid]
                self.assigned.pop(rid, None)
                self.counters["leases_expired"] += 1
        return self.dispatch()

    def _adopt(self, worker: WorkerState, held: dict[str, list[int]], now: float) -> None:
        """Reserve for the requests a worker holds when this dispatcher first hears of it: after a restart of the
        scheduler, or after the worker was dropped (silent too long, or reported failed) and came back. ``held``:
        request id -> [prompt tokens, max new tokens per sequence, n], reserved as ``dispatch`` would."""
        for rid, (prompt_tokens, max_new_tokens, n) in held.items():
            if rid in self.assigned:
                continue
            req = QueuedRequest(rid, prompt_tokens, max_new_tokens, n)
            self._estimate_output(req)
            self._reserve(req, worker, now, adopted=True)
            self.counters["adopted"] += 1

    def needs_cache_snapshot(self, worker_id: str) -> bool:
        """Whether the worker should send its whole set of cached hashes with its next heartbeat (after a gap)."""
        worker = self.workers.get(worker_id)
        return worker is not None and worker.prefix_index.needs_snapshot

    def set_routable(self, worker_ids: set[str]) -> list[Placement]:
        """Serve's controller routes to exactly these replicas now: a worker missing here is starting (not yet
        reachable) or stopping (draining its requests), and gets no new ones."""
        self.routable = set(worker_ids)
        return self.dispatch()

    def remove_worker(self, worker_id: str) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        self.counters["workers_lost"] += 1
        for rid in worker.inflight:
            self.assigned.pop(rid, None)

    def expire(self) -> list[str]:
        """Drop workers whose heartbeats stopped; returns their ids."""
        now = self.clock()
        lost = [wid for wid, w in self.workers.items() if now - w.last_seen > self.worker_timeout_s]
        for wid in lost:
            self.remove_worker(wid)
        return lost

    # ------------------------------------------------------------------ reporting
    def retry_after_s(self) -> float:
        """Seconds until the queue has probably drained: its length over the recent finishing rate."""
        window = 10.0
        now = self.clock()
        recent = sum(1 for t in self._releases if now - t <= window)
        if recent == 0:
            return self.min_retry_after_s
        return float(min(max(math.ceil(len(self.waiting) / (recent / window)), self.min_retry_after_s), 60))

    def snapshot(self) -> dict[str, Any]:
        return {
            "num_waiting": len(self.waiting),
            "num_assigned": len(self.assigned),
            "routable": sorted(self.routable) if self.routable is not None else None,
            "counters": dict(self.counters),
            "routing": {"policy": getattr(self.routing, "name", type(self.routing).__name__),
                        "decisions": dict(self.routing.decisions)},
            "workers": {
                wid: {"inflight": len(w.inflight), "load_tokens": w.load_tokens, "reserved_blocks": w.reserved_blocks,
                      "max_inflight": w.max_inflight, "age_s": self.clock() - w.last_seen,
                      "cached_blocks": len(w.prefix_index.confirmed),
                      "optimistic_blocks": len(w.prefix_index.optimistic),
                      "cache_snapshots": w.prefix_index.snapshots,
                      "stats": {k: v for k, v in w.stats.items() if k != "active_request_ids"}}
                for wid, w in self.workers.items()
            },
        }
