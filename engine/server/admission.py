"""Who gets in: the optional API key, and the bound on requests waiting for the engine.

The engine runs at most ``max_num_seqs`` sequences; the server admits ``max_queue`` engine requests
beyond that and answers 429 (with Retry-After) to the rest, instead of letting an unbounded queue
grow latency for everyone. A request with ``n`` choices counts as n engine requests.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from engine.server.errors import APIError


class Admission:
    def __init__(self, max_running: int, max_queue: int, retry_after_s: int) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # engine requests admitted and not yet released

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queue

    def admit(self, n: int) -> Ticket:
        """A ticket for ``n`` engine requests, or 429 when the queue cannot take them now (400
        when it never could: retrying would not help)."""
        if n > self.capacity:
            raise APIError(400, f"the request needs {n} engine requests (prompts x n); this server admits at "
                           f"most {self.capacity} at once", param="n")
        if self.in_flight + n > self.capacity:
            raise APIError(
                429, f"the server is at capacity ({self.in_flight} requests in flight, at most "
                f"{self.max_running} running and {self.max_queue} waiting); retry later",
                code="rate_limit_exceeded", headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += n
        return Ticket(self, n)


class Ticket:
    def __init__(self, admission: Admission, n: int) -> None:
        self._admission = admission
        self._n = n

    def release(self) -> None:
        """Idempotent: the streaming path and the error path may both release."""
        self._admission.in_flight -= self._n
        self._n = 0


class APIKeyCheck:
    """A FastAPI dependency: 401 unless the request carries ``Authorization: Bearer <key>``."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    async def __call__(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
