"""The ingress side of a request's trip: a worker from the scheduler, then its tokens over that worker's channel.

``Streams.start`` asks the scheduler for a worker (``admit``: may wait in the global queue, or be refused; a call
that cannot even reach a scheduler replica within ``scheduler_reach_s``, because the replica died and Serve is
starting another, is answered 503 + Retry-After at once rather than left waiting for the restart;
with a prefix-aware routing policy the request carries its prompt's block hashes, ``hash_block_size`` set),
makes sure this ingress has a channel open to that worker, registers the request's queue on it and submits
the request. A worker that turns out to be gone, or a channel that closed for idleness at that moment, gives
the reservation back and asks again (``max_attempts``), so a client sees an error only if that keeps failing.

One ``Channel`` per worker replica reads that worker's batches and hands each item to its request's queue.
If the channel fails (the worker died), every request on it gets the error at once: nothing hangs.

A request's ``Deadline`` bounds all of it: admission and the first item (``start_all`` waits no longer), then
every later item (a timer per prompt puts the deadline in its queue, so the stream's hot path pays nothing per
item). Past it the request fails with a 408 and is closed, which aborts it on its worker.

``close`` ends a request, finished or not: an unfinished one is aborted on its worker, and the scheduler's
reservation is released. It is synchronous on purpose: it runs when a client disconnects, inside a cancelled
anyio scope where every ``await`` raises again, so it only starts background tasks. A batch of prompts is one
request: when one prompt cannot start (refused, or its worker lost), ``start_all`` cancels the others before
closing them all.

Calls to the workers are made *detached* from the HTTP request being served. Serve ties a handle call to the
request in whose context it is made: it cancels the call when that request is cancelled, and it matches
replicas to queued calls by the request's id, so two concurrent pinned calls from one request (a batch of
prompts) can swap replicas. A channel belongs to no request, and submit / abort are cancelled only by us.
"""

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from gpt2serve.actors.openai_api import APIError
from gpt2serve.actors.prefix_index import prompt_hashes
from gpt2serve.actors.protocol import Admission, LoRARef, QueuedRequest, Refusal, StepItem, WorkerError, WorkRequest
from gpt2serve.engine.sampling_params import SamplingParams

log = logging.getLogger("ray.serve")
WORKER_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
# How long an admit call may take to reach a scheduler replica (not to be answered: it may then wait in the global
# queue). A live replica takes it at once; none within this is a restart, which takes seconds.
SCHEDULER_REACH_S = 2.0


def detached(call):
    """Make a handle call outside the current Serve request's context (see the module docstring)."""
    return contextvars.Context().run(call)


@dataclass(frozen=True)
class Deadline:
    """When a request must be over (``time.monotonic()``), and the timeout it came from (for the message)."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float, start: float | None = None) -> "Deadline":
        return cls((time.monotonic() if start is None else start) + timeout_s, timeout_s)

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def error(self) -> APIError:
        # 408, as Serve's own request_timeout_s answers; OpenAI's client retries it.
        return APIError(408, f"the request did not finish within its timeout of {self.timeout_s:g} s and was "
                             "stopped (set a longer `timeout`, or ask for fewer tokens)", "timeout")


class ChannelClosed(Exception):
    """The channel ended; ``worker_gone`` if because its worker failed."""

    def __init__(self, message: str, worker_gone: bool):
        super().__init__(message)
        self.worker_gone = worker_gone


class Channel:
    def __init__(self, worker, worker_id: str, channel_id: str):
        self.worker_id = worker_id
        self.channel_id = channel_id
        self.queues: dict[str, asyncio.Queue] = {}
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read(worker), context=contextvars.Context())

    def register(self, request_id: str) -> asyncio.Queue:
        queue = self.queues[request_id] = asyncio.Queue()
        return queue

    async def _read(self, worker) -> None:
        stream = worker.options(stream=True).channel.remote(self.channel_id, replica=self.worker_id)
        error = ChannelClosed(f"the channel to worker {self.worker_id} closed", worker_gone=False)
        try:
            await stream.__anext__()  # the worker's acknowledgement
            self.ready.set_result(None)
            async for batch in stream:
                for request_id, item in batch:
                    queue = self.queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(item)
        except WORKER_LOST as e:
            error = ChannelClosed(f"the model worker died ({type(e).__name__})", worker_gone=True)
        except Exception as e:  # noqa: BLE001 - e.g. the call reached another replica, which refused it
            error = ChannelClosed(f"the channel to worker {self.worker_id} failed: {e!r}", worker_gone=True)
        finally:
            self.closed = True
            if not self.ready.done():
                self.ready.set_exception(error)
                self.ready.exception()  # retrieved: no "never retrieved" warning when nobody waited
            for queue in self.queues.values():
                queue.put_nowait(error)
            stream.cancel()


@dataclass(eq=False)
class Job:
    """One prompt's trip: its worker, its queue on that worker's channel, its first item."""

    request_id: str
    prompt_ids: list[int]
    worker_id: str | None = None
    channel: Channel | None = None
    queue: asyncio.Queue | None = None
    first: StepItem | None = None
    lora: LoRARef | None = None  # the adapter load its admission named
    submitted: bool = False
    done: bool = False
    worker_failed: bool = False
    closed: bool = False
    output_tokens: int = 0  # received from the worker, all sequences together
    n: int = 1
    attempts: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None  # puts the request's Deadline in its queue when it is due


def worker_error(item: WorkerError) -> APIError:
    return APIError(item.status, item.message, item.param, retry_after_s=item.retry_after_s)


class Streams:
    def __init__(self, scheduler, worker, max_model_len: int, max_attempts: int = 3,
                 hash_block_size: int | None = None, scheduler_reach_s: float = SCHEDULER_REACH_S):
        self.scheduler = scheduler
        self.scheduler_reach_s = scheduler_reach_s
        self.hash_block_size = hash_block_size  # the engine's block size, when routing reads prefix hashes
        self.worker = worker
        self.max_model_len = max_model_len
        self.max_attempts = max_attempts
        self.channels: dict[str, Channel] = {}
        self._prefix = uuid.uuid4().hex[:8]
        self._background: set[asyncio.Task] = set()

    async def start_all(self, rid: str, prompts: list[list[int]], params: SamplingParams,
                        priority: int, lora: LoRARef | None = None, deadline: Deadline | None = None) -> list[Job]:
        """``lora``: the adapter the request names, as this ingress last knew it (its uid keys the prefix hashes;
        the scheduler's admission says which load the request really gets). ``deadline``: past it, the request
        fails with a 408 (APIError) wherever it is, and is cancelled or aborted."""
        # Engine ids must be unique even when two clients send the same X-Request-Id.
        base = f"{rid}-{uuid.uuid4().hex[:8]}"
        jobs = [Job(f"{base}-{i}", ids, n=params.n) for i, ids in enumerate(prompts)]
        starts = [asyncio.ensure_future(self.start(job, params, priority, lora)) for job in jobs]
        try:
            started = asyncio.gather(*starts)
            await (started if deadline is None else asyncio.wait_for(started, deadline.remaining()))
        except BaseException as e:
            # One prompt failed (or the client left): the whole request has failed, so its siblings must not
            # run for nobody. gather leaves them running; cancelled, a queued one leaves the global queue
            # (``_admit``), and once they have stopped, ``close`` aborts and releases whatever they reached.
            for start in starts:
                start.cancel()
            await asyncio.wait(starts)
            for start in starts:  # the errors after the first are the same failure: retrieved, not reported
                if not start.cancelled():
                    start.exception()
            self.close(jobs)
            if isinstance(e, asyncio.TimeoutError) and deadline is not None:
                raise deadline.error() from None
            raise
        if deadline is not None:  # the rest of the way: each prompt's queue gets the deadline when it is due
            loop = asyncio.get_running_loop()
            for job in jobs:
                if not job.done:
                    job.timer = loop.call_later(deadline.remaining(), job.queue.put_nowait, deadline)
        return jobs

    async def start(self, job: Job, params: SamplingParams, priority: int, lora: LoRARef | None = None) -> None:
        max_new = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(job.prompt_ids)
        hashes = (prompt_hashes(job.prompt_ids, self.hash_block_size, lora.uid if lora else None)
                  if self.hash_block_size else ())  # ~1 µs per block: blake2b over 16 token ids
        for _ in range(self.max_attempts):
            verdict = await self._admit(QueuedRequest(job.request_id, len(job.prompt_ids), max_new, params.n,
                                                      priority, hashes, lora.name if lora else None))
            job.worker_id, job.lora = verdict.worker_id, verdict.lora
            refusal = await self._submit(job, WorkRequest(job.request_id, job.prompt_ids, params, priority,
                                                          verdict.lora))
            if refusal is None:
                break
            job.attempts.append(refusal.reason)
            job.submitted = False
            if job.channel is not None:
                job.channel.queues.pop(job.request_id, None)
            # Awaited, not fire-and-forget: the next admit must not pick the same vanished worker.
            await self._release(job.request_id, refusal.worker_gone)
            job.worker_id = None
        else:
            raise APIError(503, "no model worker could take the request (" + "; ".join(job.attempts) + "); retry",
                           retry_after_s=1)
        first = await self.next(job)
        if isinstance(first, WorkerError):
            job.done = True
            raise worker_error(first)
        job.first = first
        job.done = first.finished

    async def _admit(self, req: QueuedRequest) -> Admission:
        call = self.scheduler.admit.remote(req)
        try:
            try:
                await asyncio.wait_for(call._to_object_ref(), self.scheduler_reach_s)  # assigned to a replica
            except asyncio.TimeoutError:
                call.cancel()
                raise APIError(503, "the scheduler is restarting; retry",
                               retry_after_s=self.scheduler_reach_s) from None
            verdict = await call
        except asyncio.CancelledError:
            call.cancel()  # leaves the global queue (or gives back the reservation just made)
            self._background_call(self._release_if_admitted(call, req.request_id), "release")
            raise
        except WORKER_LOST as e:  # Serve restarts the scheduler; its queue is lost, so the client retries
            raise APIError(503, f"the scheduler is unavailable ({type(e).__name__}); retry", retry_after_s=1)
        if verdict.worker_id is None:
            raise APIError(verdict.status, verdict.message, "model" if verdict.status == 404 else None,
                           retry_after_s=verdict.retry_after_s)
        return verdict

    async def _release_if_admitted(self, call, request_id: str) -> None:
        """After cancelling ``admit``: if the scheduler had already answered (the cancel came too late to undo
        anything there), its answer still arrives, and the reservation it names is given back here rather than
        held until its lease expires. Seen when clients hang up under load, with the ingress slow to read replies."""
        try:
            verdict = await call
        except BaseException:  # noqa: BLE001 - the cancel took effect: the scheduler dropped the request itself
            return
        if verdict.worker_id is not None:
            await self._release(request_id, False)

    async def _submit(self, job: Job, work: WorkRequest) -> Refusal | None:
        try:
            channel = await self._channel(job.worker_id)
            job.channel, job.queue = channel, channel.register(job.request_id)
            job.submitted = True
            return await detached(lambda: self.worker.submit.remote(work, channel.channel_id, replica=job.worker_id))
        except ChannelClosed as e:
            return Refusal(str(e), e.worker_gone)
        except WORKER_LOST as e:
            return Refusal(f"the model worker died ({type(e).__name__})", True)

    async def _channel(self, worker_id: str) -> Channel:
        channel = self.channels.get(worker_id)
        if channel is None or channel.closed:
            channel_id = f"{self._prefix}-{worker_id}-{uuid.uuid4().hex[:6]}"
            channel = self.channels[worker_id] = Channel(self.worker, worker_id, channel_id)
        await asyncio.shield(channel.ready)  # one waiter giving up must not cancel the others' wait
        return channel

    async def next(self, job: Job) -> StepItem | WorkerError:
        item = await job.queue.get()
        if isinstance(item, ChannelClosed):
            job.worker_failed = item.worker_gone
            raise APIError(503, f"{item}; retry the request", retry_after_s=1)
        if isinstance(item, Deadline):
            raise item.error()
        if not isinstance(item, WorkerError):
            job.output_tokens += sum(len(d.token_ids) for d in item.seqs)
        return item

    async def items(self, job: Job) -> AsyncIterator[StepItem]:
        yield job.first
        while not job.done:
            item = await self.next(job)
            if isinstance(item, WorkerError):
                job.done = True
                raise worker_error(item)
            job.done = item.finished
            yield item

    async def merged(self, jobs: list[Job]) -> AsyncIterator[tuple[int, StepItem]]:
        """Items of every prompt's stream as they come (one stream needs no task)."""
        if len(jobs) == 1:
            async for item in self.items(jobs[0]):
                yield 0, item
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for item in self.items(job):
                    queue.put_nowait((i, item))
                queue.put_nowait((i, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def close(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.closed:
                continue
            job.closed = True
            if job.timer is not None:
                job.timer.cancel()
            if job.channel is not None:
                job.channel.queues.pop(job.request_id, None)
            if job.submitted and not job.done and not job.worker_failed:
                self._background_call(
                    detached(lambda: self.worker.abort.remote(job.request_id, replica=job.worker_id)), "abort")
            if job.worker_id is not None:
                # How far it got feeds the scheduler's reservation estimate (admission.OutputLengths).
                self._background_call(self._release(job.request_id, job.worker_failed,
                                                    -(-job.output_tokens // job.n)), "release")

    async def _release(self, request_id: str, worker_failed: bool, output_tokens_per_seq: int | None = None) -> None:
        await detached(lambda: self.scheduler.release.remote(request_id, worker_failed, output_tokens_per_seq))

    def _background_call(self, awaitable, what: str) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception as e:  # noqa: BLE001 - the worker may be gone; the scheduler's lease expires anyway
                log.warning("%s failed: %r", what, e)

        task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
