"""Whether an engine's step loop still makes progress: the verdict behind a worker's health check.

A step loop can stop making progress in two ways that its heartbeats do not show: a step that never returns (a
hung kernel, a device gone), and steps that keep raising (every request routed there fails). ``StepWatchdog``
is told what the loop does (``working`` when it leaves its idle wait, ``stepped`` when a step completed,
``failed`` when one raised, ``idle`` when it waits for work again) and judges:

- **stalled**: the loop holds work (it is not idle) and no step has completed for ``stall_timeout_s``;
- **failing**: ``max_failed_steps`` steps in a row raised.

The verdict latches: once unhealthy, always unhealthy. Serve needs several failed health checks in a row before
it replaces a replica, and by then the worker has failed its requests and refuses new ones, so a step that
recovers in between must not make the replica look healthy again.

No threads and no clock of its own: the loop reports, anyone asks (``unhealthy``), and tests pass a clock.
"""

from __future__ import annotations

import time
from typing import Callable


class StepWatchdog:
    def __init__(self, stall_timeout_s: float | None = None, max_failed_steps: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stall_timeout_s = stall_timeout_s
        self.max_failed_steps = max_failed_steps
        self.clock = clock
        self.progress_at: float | None = None  # last completed step, or when work arrived; None while idle
        self.failed_in_a_row = 0
        self.last_error: BaseException | None = None
        self.verdict: str | None = None

    def working(self) -> None:
        """The loop has work (it left its idle wait): progress is due from now on."""
        if self.progress_at is None:
            self.progress_at = self.clock()

    def idle(self) -> None:
        """The loop waits for work: an idle engine is not stalled."""
        self.progress_at = None

    def stepped(self) -> None:
        self.progress_at = self.clock()
        self.failed_in_a_row = 0

    def failed(self, error: BaseException) -> None:
        self.failed_in_a_row += 1
        self.last_error = error

    def unhealthy(self) -> str | None:
        """Why the engine is unhealthy, or None."""
        if self.verdict is None:
            self.verdict = self._judge()
        return self.verdict

    def _judge(self) -> str | None:
        if self.max_failed_steps is not None and self.failed_in_a_row >= self.max_failed_steps:
            return f"{self.failed_in_a_row} engine steps failed in a row (the last: {self.last_error!r})"
        if self.stall_timeout_s is not None and self.progress_at is not None:
            stalled = self.clock() - self.progress_at
            if stalled > self.stall_timeout_s:
                return f"no engine step completed for {stalled:.1f} s while holding requests"
        return None
