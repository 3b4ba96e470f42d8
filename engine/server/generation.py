"""The engine side of one HTTP request: its choices (prompts x n) become engine requests, each is
validated before anything runs, and their deltas come back merged, tagged with the choice index.

Leaving the merged stream early (client gone, error) cancels every engine request of it, which
aborts them in the engine and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from engine.async_llm import AsyncLLM
from engine.errors import InvalidRequestError
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprobs
from engine.server.errors import APIError
from engine.server.metrics import ServerMetrics


@dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None


def fan_out(prompts: list[tuple[list[int], SamplingParams]], n: int) -> list[Choice]:
    """n choices per prompt. Choice i of a seeded request samples with seed + i, so the n choices
    differ and the whole response is reproducible."""
    choices = []
    for p, (ids, params) in enumerate(prompts):
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            choices.append(Choice(p * n + i, p, ids, dataclasses.replace(params, seed=seed)))
    return choices


def validate(llm: AsyncLLM, choices: list[Choice]) -> None:
    """The engine's own checks, up front: a bad request answers 400 before any choice runs."""
    for choice in choices:
        try:
            llm.engine.validate(choice.prompt_ids, choice.params)
        except InvalidRequestError as e:
            raise APIError.from_invalid_request(e) from None


async def merged_deltas(llm: AsyncLLM, metrics: ServerMetrics, request_id: str,
                        choices: list[Choice]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """(choice index, delta) from every choice, as they arrive, until all have finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for delta in llm.generate(choice.prompt_ids, choice.params, f"{request_id}-{choice.index}"):
                queue.put_nowait((choice.index, delta))
        except Exception as e:  # an engine failure: end the merged stream with it
            queue.put_nowait((choice.index, e))

    timers = {c.index: metrics.timer(len(c.prompt_ids)) for c in choices}
    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(choices)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            timers[index].on_tokens(len(item.token_ids))
            if item.finished:
                remaining -= 1
                timers[index].on_finish(item.finish_reason or "stop")
            yield index, item
    finally:
        # Everything that must happen comes before the first await: under a cancelled anyio
        # scope (Starlette's, when a streaming client leaves) every await here raises again.
        for task in tasks:
            task.cancel()  # each pump's generator then aborts its engine request
        for timer in timers.values():
            timer.on_finish("abort")  # no-op for those that finished
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(llm: AsyncLLM, metrics: ServerMetrics, request_id: str, choices: list[Choice]) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in choices]
    async with aclosing(merged_deltas(llm, metrics, request_id, choices)) as deltas:
        async for index, delta in deltas:
            r = results[index]
            r.token_ids += delta.token_ids
            r.text += delta.text
            if delta.logprobs:
                r.logprobs += delta.logprobs
            if delta.prompt_logprobs is not None:
                r.prompt_logprobs = delta.prompt_logprobs
            if delta.finished:
                r.finish_reason = delta.finish_reason
    return results


T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` (a non-streaming request) but cancel it if the client goes away first, so
    that its engine requests are aborted. The body must have been read already."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([work_task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if not work_task.done() or work_task.cancelled():
        raise APIError(499, "client disconnected")
    return work_task.result()
