"""Errors a caller can act on. The HTTP layer maps them to OpenAI-style error bodies."""


class InvalidRequestError(ValueError):
    """A request the engine refuses before it touches any state; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineStepError(RuntimeError):
    """An engine step raised, and every request in flight was dropped with it. The requests themselves may be
    fine: a retry, on another replica if this one keeps failing, may well succeed."""


class EngineUnhealthyError(RuntimeError):
    """The engine stopped making progress (``engine/watchdog.py``): its replica should be replaced."""
