"""Errors a caller can act on. The HTTP layer maps them to OpenAI-style error bodies."""


class InvalidRequestError(ValueError):
    """A request the engine refuses before it touches any state; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
