"""Errors the engine reports to its callers."""


class InvalidRequestError(ValueError):
    """One request is malformed (empty prompt, prompt too long, bad sampling field).

    ``field`` names the offending field so that a server can map it to a 400 response; the
    message always names it too.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid request: {field}: {message}")
