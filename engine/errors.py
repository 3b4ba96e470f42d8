"""Errors the engine reports to its callers."""


class InvalidRequestError(ValueError):
    """One request is malformed (empty prompt, prompt too long, bad sampling field).

    ``field`` names the offending field so that a server can map it to a 400 response; the
    message always names it too.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid request: {field}: {message}")


class RequestFailedError(RuntimeError):
    """One request failed inside an engine step (its stop check, detokenization or output); it
    ended alone and the other requests went on. ``AsyncLLM`` streams raise it."""

    def __init__(self, request_id: str, message: str) -> None:
        self.request_id = request_id
        super().__init__(f"request {request_id!r} failed: {message}")
