"""Tests only: an engine whose steps can be made to raise or hang on demand, to show that faults heal.

With ``fault_injection: true`` in the service config, each worker wraps its engine in ``FaultyEngine`` and
serves ``inject_fault(mode, replica=...)``; without it, the engine is the plain ``LLMEngine`` and the call is
refused. The fault lives in this wrapper's ``step``, so the engine's own step loop carries no test flag.

Modes: ``"raise"`` (every step raises, as a device error would), ``"hang"`` (a step blocks, as a hung kernel
would, for at most ``HANG_LIMIT_S``), None (steps run again).
"""

from __future__ import annotations

import threading
from typing import Any

FAULT_MODES = (None, "raise", "hang")
HANG_LIMIT_S = 600.0  # a hung step still ends some day: the replica is replaced long before


class InjectedFault(RuntimeError):
    pass


class FaultyEngine:
    """Delegates everything to ``engine``, except that ``step`` obeys the injected fault."""

    def __init__(self, engine: Any):
        self._engine = engine
        self._mode: str | None = None
        self._released = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def inject(self, mode: str | None) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault {mode!r}; known: {', '.join(map(str, FAULT_MODES))}")
        self._mode = mode
        if mode == "hang":
            self._released.clear()
        else:
            self._released.set()

    def step(self) -> list:
        if self._mode == "raise":
            raise InjectedFault("injected fault: the engine step raised")
        if self._mode == "hang":
            self._released.wait(HANG_LIMIT_S)
        return self._engine.step()
