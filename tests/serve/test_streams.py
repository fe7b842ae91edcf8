"""The ingress's request plumbing (actors/streams.py) against fake scheduler and worker handles, without Ray.

The fakes behave like Serve handles: ``.remote()`` returns an awaitable (or, for ``channel``, an async iterator
with ``cancel()``), and the worker keeps real outboxes, so admission, channel sharing, retries after a worker
vanishes, failure propagation and cancellation run through the real code.
"""

import asyncio

import pytest

from gpt2serve.actors.openai_api import APIError
from gpt2serve.actors.protocol import Admission, Refusal, SeqDelta, StepItem, WorkerError, retryable
from gpt2serve.actors.streams import Deadline, Streams
from gpt2serve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(30)


class Call:
    def __init__(self, coro):
        self.coro = coro
        self.cancelled = False

    def __await__(self):
        return self.coro.__await__()

    async def _to_object_ref(self):  # Serve's "assigned to a replica": at once, as with a live scheduler
        return None

    def cancel(self):
        self.cancelled = True


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeScheduler:
    def __init__(self, choices):
        self.choices = list(choices)  # worker ids to hand out, in order
        self.released: list[tuple[str, bool]] = []
        self.output_tokens: dict[str, int | None] = {}  # what each release said the request wrote per sequence
        self.admit = Method(lambda req: Call(self._admit(req)))
        self.release = Method(lambda rid, failed=False, tokens=None: Call(self._release(rid, failed, tokens)))

    async def _admit(self, req):
        return Admission(self.choices.pop(0) if self.choices else None, 503, "no worker")

    async def _release(self, rid, failed, tokens):
        self.released.append((rid, failed))
        self.output_tokens[rid] = tokens


class FakeChannelStream:
    def __init__(self, worker, channel_id, replica):
        self.worker, self.channel_id, self.replica = worker, channel_id, replica
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.started = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.started:
            self.started = True
            if self.replica in self.worker.gone:
                raise RuntimeError(f"channel for replica {self.replica} reached another one")
            self.worker.channels[self.channel_id] = self
            return []
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeWorker:
    """Replicas by id; ``gone`` ones refuse everything, as a replacement replica would."""

    def __init__(self, gone=()):
        self.gone = set(gone)
        self.channels: dict[str, FakeChannelStream] = {}
        self.submitted: list[tuple[str, str]] = []
        self.aborted: list[str] = []
        self.submit = Method(lambda work, channel_id, replica=None: Call(self._submit(work, channel_id, replica)))
        self.abort = Method(lambda rid, replica=None: Call(self._abort(rid)))

    def options(self, stream=False):
        outer = self

        class Streaming:
            channel = Method(lambda channel_id, replica=None: FakeChannelStream(outer, channel_id, replica))

        return Streaming()

    async def _submit(self, work, channel_id, replica):
        if replica in self.gone:
            return Refusal(f"replica {replica} is gone", True)
        self.submitted.append((work.request_id, replica))
        return None

    async def _abort(self, rid):
        self.aborted.append(rid)

    def emit(self, request_id, text, finished=False, channel=None):
        stream = channel or next(iter(self.channels.values()))
        delta = SeqDelta(0, text, [1], None, "length" if finished else None, None)
        stream.queue.put_nowait([(request_id, StepItem([delta], finished))])


def params(**kw):
    return SamplingParams(max_tokens=4, **kw)


async def settle():
    for _ in range(20):  # enough loop turns for a request to go through admit, channel and submit
        await asyncio.sleep(0)


def test_request_streams_over_the_chosen_workers_channel():
    async def go():
        scheduler, worker = FakeScheduler(["w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1, 2, 3]], params(), 0))
        await settle()
        ((rid, replica),) = worker.submitted
        assert replica == "w1"
        worker.emit(rid, "a")
        (job,) = await start
        worker.emit(rid, "b", finished=True)
        texts = [item.seqs[0].text async for _, item in streams.merged([job])]
        streams.close([job])
        await settle()
        assert texts == ["a", "b"]
        assert scheduler.released == [(rid, False)] and worker.aborted == []
        assert scheduler.output_tokens[rid] == 2  # how far it got: the scheduler's reservation estimate learns it

    asyncio.run(go())


def test_concurrent_requests_share_one_channel_per_worker():
    async def go():
        scheduler, worker = FakeScheduler(["w1", "w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1], [2]], params(), 0))
        await settle()
        assert len(worker.channels) == 1 and len(worker.submitted) == 2
        for rid, _ in worker.submitted:
            worker.emit(rid, "x", finished=True)
        jobs = await start
        assert all(job.done for job in jobs)

    asyncio.run(go())


def test_a_vanished_worker_is_reported_and_the_request_goes_elsewhere():
    async def go():
        scheduler, worker = FakeScheduler(["dead", "w2"]), FakeWorker(gone={"dead"})
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1, 2]], params(), 0))
        for _ in range(20):
            await settle()
            if worker.submitted:
                break
        ((rid, replica),) = worker.submitted
        assert replica == "w2"
        assert scheduler.released == [(rid, True)]  # the scheduler is told "dead" is gone, before re-admission
        worker.emit(rid, "ok", finished=True)
        (job,) = await asyncio.wait_for(start, 5)
        assert job.first.seqs[0].text == "ok"

    asyncio.run(go())


def test_gives_up_with_503_after_max_attempts():
    async def go():
        scheduler, worker = FakeScheduler(["a", "b", "c"]), FakeWorker(gone={"a", "b", "c"})
        streams = Streams(scheduler, worker, max_model_len=64)
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(streams.start_all("r", [[1]], params(), 0), 5)
        assert e.value.status == 503 and e.value.retry_after_s
        assert [failed for _, failed in scheduler.released] == [True, True, True]

    asyncio.run(go())


def test_refusal_by_the_scheduler_becomes_the_http_error():
    async def go():
        scheduler = FakeScheduler([])
        scheduler.admit = Method(lambda req: Call(_verdict()))

        async def _verdict():
            return Admission(None, 429, "full", 3.0)

        streams = Streams(scheduler, FakeWorker(), max_model_len=64)
        with pytest.raises(APIError) as e:
            await streams.start_all("r", [[1]], params(), 0)
        assert (e.value.status, e.value.retry_after_s) == (429, 3.0)

    asyncio.run(go())


def test_engine_refusal_is_a_400_and_releases():
    async def go():
        scheduler, worker = FakeScheduler(["w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1]], params(), 0))
        await settle()
        ((rid, _),) = worker.submitted
        next(iter(worker.channels.values())).queue.put_nowait([(rid, WorkerError("too big", "max_tokens", 400))])
        with pytest.raises(APIError) as e:
            await start
        assert (e.value.status, e.value.param) == (400, "max_tokens")
        await settle()
        assert scheduler.released == [(rid, False)] and worker.aborted == []

    asyncio.run(go())


def test_worker_death_fails_every_request_on_its_channel_at_once():
    async def go():
        scheduler, worker = FakeScheduler(["w1", "w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1], [2]], params(), 0))
        await settle()
        for rid, _ in worker.submitted:
            worker.emit(rid, "x")
        jobs = await start
        from ray.exceptions import ActorDiedError

        next(iter(worker.channels.values())).queue.put_nowait(ActorDiedError())
        with pytest.raises(APIError) as e:
            async for _ in streams.merged(jobs):
                pass
        assert e.value.status == 503
        streams.close(jobs)
        await settle()
        assert sorted(failed for _, failed in scheduler.released) == [True, True]
        assert worker.aborted == []  # nothing to abort on a dead worker
        assert streams.channels["w1"].closed

    asyncio.run(go())


def test_close_of_an_unfinished_request_aborts_it_on_its_worker():
    async def go():
        scheduler, worker = FakeScheduler(["w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1]], params(), 0))
        await settle()
        ((rid, _),) = worker.submitted
        worker.emit(rid, "partial")
        jobs = await start
        streams.close(jobs)
        streams.close(jobs)  # idempotent
        await settle()
        assert worker.aborted == [rid] and scheduler.released == [(rid, False)]

    asyncio.run(go())


def test_a_cancel_that_comes_after_the_admission_still_gives_the_reservation_back():
    """The client leaves while the scheduler's answer is on its way: cancelling ``admit`` undoes nothing there, so
    the answer, once it arrives, is released (else the reservation would be held until its lease expired)."""

    class LateAnswer:
        def __init__(self):
            self.answered = asyncio.Event()
            self.cancelled = False

        def __await__(self):
            return self._wait().__await__()

        async def _to_object_ref(self):
            return None

        async def _wait(self):
            await self.answered.wait()
            return Admission("w1")

        def cancel(self):
            self.cancelled = True  # too late: the scheduler has admitted it already

    async def go():
        scheduler = FakeScheduler([])
        call = LateAnswer()
        scheduler.admit = Method(lambda req: call)
        streams = Streams(scheduler, FakeWorker(), max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1, 2]], params(), 0))
        await settle()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert call.cancelled and scheduler.released == []
        call.answered.set()
        await settle()
        (released,) = scheduler.released
        assert released[0].startswith("r-") and released[1] is False

    asyncio.run(go())


def test_a_prompt_refused_in_a_batch_cancels_its_siblings():
    """Nothing runs for nobody: when one prompt of a batch is refused, the queued ones leave the queue (their
    admit calls are cancelled) and the started ones are aborted and released; none is submitted afterwards."""

    async def go():
        scheduler, worker = FakeScheduler([]), FakeWorker()
        queued = asyncio.Event()
        calls = []

        async def verdict(req):
            index = int(req.request_id.rsplit("-", 1)[1])
            if index == 0:
                return Admission("w1")
            if index == 1:
                await queued.wait()  # admitted only once the refusal has come: too late for the client
                return Admission(None, 429, "full", 2.0)
            await asyncio.Event().wait()  # waits in the global queue

        def admit(req):
            calls.append(Call(verdict(req)))
            return calls[-1]

        scheduler.admit = Method(admit)
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1], [2], [3]], params(), 0))
        await settle()
        ((first, _),) = worker.submitted
        worker.emit(first, "x")
        queued.set()
        with pytest.raises(APIError) as e:
            await start
        assert e.value.status == 429
        await settle()
        assert calls[2].cancelled and not calls[0].cancelled  # the queued prompt left the queue
        assert worker.aborted == [first] and scheduler.released == [(first, False)]
        assert [rid for rid, _ in worker.submitted] == [first]

    asyncio.run(go())


# ---------------------------------------------------------------------- deadlines and retryable failures
def test_a_deadline_reached_in_the_queue_is_a_408_and_leaves_the_queue():
    async def go():
        scheduler, worker = FakeScheduler([]), FakeWorker()
        calls = []

        def admit(req):
            calls.append(Call(asyncio.Event().wait()))  # waits in the global queue for good
            return calls[-1]

        scheduler.admit = Method(admit)
        streams = Streams(scheduler, worker, max_model_len=64)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(APIError) as e:
            await streams.start_all("r", [[1]], params(), 0, deadline=Deadline.after(0.2))
        assert 0.2 <= asyncio.get_running_loop().time() - t0 < 1.0
        assert (e.value.status, e.value.param, e.value.type) == (408, "timeout", "RequestTimeoutError")
        assert "within its timeout of 0.2 s" in e.value.message
        assert calls[0].cancelled and worker.submitted == []  # out of the queue, never started

    asyncio.run(go())


def test_a_deadline_reached_mid_stream_is_a_408_and_aborts_the_request():
    async def go():
        scheduler, worker = FakeScheduler(["w1", "w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1], [2]], params(), 0, deadline=Deadline.after(0.3)))
        await settle()
        for rid, _ in worker.submitted:
            worker.emit(rid, "x")
        jobs = await start
        seen = []
        with pytest.raises(APIError) as e:
            async for i, _ in streams.merged(jobs):
                seen.append(i)
                if len(seen) <= 3:  # three more tokens, then the worker goes quiet (a slow or hung step)
                    worker.emit(jobs[i].request_id, "y")
        assert e.value.status == 408 and len(seen) == 2 + 3
        streams.close(jobs)
        await settle()
        assert sorted(worker.aborted) == sorted(j.request_id for j in jobs)
        assert sorted(failed for _, failed in scheduler.released) == [False, False]

    asyncio.run(go())


def test_a_request_that_ends_in_time_leaves_no_timer_behind():
    async def go():
        scheduler, worker = FakeScheduler(["w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        start = asyncio.create_task(streams.start_all("r", [[1]], params(), 0, deadline=Deadline.after(0.2)))
        await settle()
        ((rid, _),) = worker.submitted
        worker.emit(rid, "a")
        (job,) = await start
        worker.emit(rid, "b", finished=True)
        assert [item.seqs[0].text async for _, item in streams.merged([job])] == ["a", "b"]
        streams.close([job])
        assert job.timer.cancelled()
        await asyncio.sleep(0.3)
        assert job.queue.empty() and worker.aborted == []

    asyncio.run(go())


def test_a_replica_failing_a_request_for_its_own_trouble_is_a_retryable_503():
    async def go():
        scheduler, worker = FakeScheduler(["w1", "w1"]), FakeWorker()
        streams = Streams(scheduler, worker, max_model_len=64)
        first = asyncio.create_task(streams.start_all("a", [[1]], params(), 0))
        await settle()
        ((rid, _),) = worker.submitted
        worker.emit(rid, "x")
        (job,) = await first
        next(iter(worker.channels.values())).queue.put_nowait([(rid, retryable("the model worker failed a step"))])
        with pytest.raises(APIError) as e:
            async for _ in streams.merged([job]):
                pass
        assert (e.value.status, e.value.retry_after_s) == (503, 1.0) and e.value.message.endswith("retry the request")

        second = asyncio.create_task(streams.start_all("b", [[1]], params(), 0))  # before its first token
        await settle()
        rid = worker.submitted[-1][0]
        next(iter(worker.channels.values())).queue.put_nowait([(rid, retryable("the model worker became unhealthy"))])
        with pytest.raises(APIError) as e:
            await second
        assert (e.value.status, e.value.type, e.value.retry_after_s) == (503, "ServiceUnavailableError", 1.0)

    asyncio.run(go())


def test_an_admission_that_reaches_no_scheduler_replica_is_a_quick_retryable_503():
    """The scheduler replica died and Serve is starting another: the call is not even assigned to a replica. It is
    cancelled after scheduler_reach_s and answered 503 + Retry-After, instead of waiting for the restart."""

    class Unassigned:
        cancelled = False

        async def _to_object_ref(self):
            await asyncio.Event().wait()  # no replica to take it

        def __await__(self):
            raise AssertionError("a call that reached no replica has no answer to wait for")

        def cancel(self):
            self.cancelled = True

    async def go():
        scheduler, worker = FakeScheduler([]), FakeWorker()
        calls = []
        scheduler.admit = Method(lambda req: calls.append(Unassigned()) or calls[-1])
        streams = Streams(scheduler, worker, max_model_len=64, scheduler_reach_s=0.2)
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(streams.start_all("r", [[1]], params(), 0), 5)
        assert (e.value.status, e.value.retry_after_s) == (503, 0.2) and "restarting" in e.value.message
        assert calls[0].cancelled and scheduler.released == [] and worker.submitted == []

    asyncio.run(go())
