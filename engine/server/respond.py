"""A generation request's HTTP answer: admitted (or 429), then streamed as SSE or collected into one
JSON body. The admission ticket is released however the answer ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.server.generation import Choice, ChoiceResult, collect, until_disconnected
from engine.server.state import ServerState
from engine.server.streaming import SSEResponse


class GenerationRun(Protocol):
    """A validated completions or chat request (CompletionRun, ChatRun)."""

    id: str
    choices: list[Choice]

    @property
    def stream(self) -> bool: ...

    def chunks(self) -> AsyncIterator[dict]: ...

    def body(self, results: list[ChoiceResult]) -> dict: ...


async def respond(http: Request, state: ServerState, run: GenerationRun) -> Response:
    ticket = state.admission.admit(len(run.choices))
    if run.stream:
        return SSEResponse(run.chunks(), ticket.release)
    try:
        results = await until_disconnected(http, collect(state.llm, state.metrics, run.id, run.choices))
    finally:
        ticket.release()
    return JSONResponse(run.body(results))
