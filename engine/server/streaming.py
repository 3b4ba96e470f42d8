"""Server-sent events in OpenAI's shape: ``data: <json chunk>`` per event, ``data: [DONE]`` last.

A failure after the response started cannot change its status any more: it is sent as one
``data: {"error": ...}`` event before ``[DONE]``. However the response ends (done, client gone,
cancelled before it began), the chunk iterator is closed, which cancels its engine requests, and
``on_close`` runs once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable

from fastapi.responses import StreamingResponse

from engine.server.errors import APIError

log = logging.getLogger("engine.server")

DONE = "data: [DONE]\n\n"


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(chunks: AsyncGenerator[dict, None]) -> AsyncGenerator[str, None]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except APIError as e:
        yield event(e.body())
    except Exception as e:  # noqa: BLE001 - the stream ends with the error, the server stays up
        log.exception("stream failed")
        yield event(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
    finally:
        await chunks.aclose()
    yield DONE


class SSEResponse(StreamingResponse):
    def __init__(self, chunks: AsyncGenerator[dict, None], on_close: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_close = on_close
        super().__init__(sse_events(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[union-attr]
                await self._chunks.aclose()  # never started: closing it is a no-op
            finally:
                self._on_close()
