"""The streaming API the Ray worker wraps: ``generate`` is an async iterator of deltas, ``abort`` stops one.

The step runs in a worker thread so that the event loop stays free for new requests and streaming. Adds and
aborts are queued and applied by that thread between steps, so that the engine is only ever touched by one
thread at a time. Cancelling the consumer of ``generate`` (a client that went away) aborts the request: this
is the one place where cancellation turns into freed KV blocks.

A step that raises fails the requests in flight (each gets an ``EngineStepError``, their blocks are freed) and
the loop goes on. The loop reports to a ``StepWatchdog`` (``engine/watchdog.py``), so that ``check_health`` also
fails when steps keep raising or one never returns.

Under ``generate`` is ``add_request``: a request whose deltas go to a plain callback, called on the event loop
for every request of a step in one pass after the step. A server that forwards deltas (the Ray worker) uses it
directly and pays one wake-up per step rather than one task switch per request per step.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any, AsyncIterator, Callable

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import EngineStepError, EngineUnhealthyError, InvalidRequestError
from gpt2serve.engine.llm_engine import LLMEngine
from gpt2serve.engine.outputs import RequestOutput
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.watchdog import StepWatchdog

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, config: EngineConfig | LLMEngine, watchdog: StepWatchdog | None = None):
        # An engine given ready-made may be any object with LLMEngine's make_request / submit / abort / step.
        self.engine = LLMEngine(config) if isinstance(config, EngineConfig) else config
        self.watchdog = watchdog or StepWatchdog()  # by default it judges nothing: no limits set
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._pending: deque[Callable[[], RequestOutput | None]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields one RequestOutput per step with this request's new tokens and text (deltas)."""
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt, params, queue.put_nowait, priority, lora_name)
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine already dropped the request
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # cancelled, or the consumer stopped early
                self.abort_request(request_id)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None,
                    on_output: Callable[[RequestOutput | BaseException], None], priority: int = 0,
                    lora_name: str | None = None) -> None:
        """Start a request; each step's delta for it is passed to ``on_output`` on this event loop, the last one
        with ``finished`` set, or the exception that failed it. Raises InvalidRequestError (nothing started)."""
        if request_id in self._sinks:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", "request_id")
        req, state = self.engine.make_request(request_id, prompt, params, priority, stream=True, lora_name=lora_name)
        self._sinks[request_id] = on_output
        self._pending.append(lambda: self.engine.submit(req, state))
        self._kick()

    def abort_request(self, request_id: str) -> None:
        """Stop a request started here; its callback gets nothing more. No-op for one already finished."""
        if self._sinks.pop(request_id, None) is not None:
            self._pending.append(lambda: self.engine.abort(request_id))
            self._kick()

    async def abort(self, request_id: str) -> None:
        """Stop a request from outside: its stream ends with a last delta whose finish_reason is "abort"."""
        self._pending.append(lambda: self.engine.abort(request_id))
        self._kick()

    async def add_lora(self, name: str, path: str, uid: str | None = None) -> str:
        """``LLMEngine.add_lora`` without stalling the steps: the files are read beside them, and the adapter is
        registered between two steps. Raises LoRAError."""
        adapter = await asyncio.to_thread(self.engine.read_lora, name, path, uid)
        return await self._between_steps(lambda: self.engine.register_lora(adapter))

    async def remove_lora(self, name: str) -> None:
        """``LLMEngine.remove_lora``, between two steps: requests using the adapter finish with it."""
        await self._between_steps(lambda: self.engine.remove_lora(name))

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()

    async def check_health(self) -> None:
        reason = self.unhealthy()
        if reason is not None:
            raise EngineUnhealthyError(reason)

    def unhealthy(self) -> str | None:
        """Why this engine cannot serve any more (its step loop died, stalled, or keeps failing), or None."""
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            return f"engine loop died: {task.exception()!r}"
        return self.watchdog.unhealthy()

    # ------------------------------------------------------------------ the loop
    def _kick(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _between_steps(self, change: Callable[[], Any]) -> Any:
        """Run ``change`` on the step thread between two steps (the only thread that touches the engine) and
        return its result or raise its exception here."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                result = change()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                # e=e: Python unbinds ``e`` when the except block ends, which can come before the loop runs this
                loop.call_soon_threadsafe(lambda e=e: done.done() or done.set_exception(e))
            else:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        self._pending.append(run)
        self._kick()
        return await done

    def _step(self) -> list[RequestOutput]:
        outputs = []
        while self._pending:
            out = self._pending.popleft()()
            if out is not None:
                outputs.append(out)
        if self.engine.has_unfinished():
            outputs += self.engine.step()
        return outputs

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending and not self.engine.has_unfinished():
                self.watchdog.idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self.watchdog.working()
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as e:  # a bug in a step: fail the requests in flight, free their blocks, go on
                log.exception("engine step failed")
                self.watchdog.failed(e)
                sinks, self._sinks = self._sinks, {}
                for request_id, sink in sinks.items():
                    self.engine.abort(request_id)
                    sink(EngineStepError(f"engine step failed: {e!r}"))
                continue
            self.watchdog.stepped()
            for out in outputs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    try:
                        sink(out)
                    except Exception:  # noqa: BLE001 - one consumer's bug must not stop the loop for all
                        log.exception("output callback of request %s failed", out.request_id)
