"""Streaming interface for the server: one async iterator of deltas per request, cancellable.

The engine steps in a worker thread (a step blocks on the GPU); requests and aborts arriving on
the event loop are queued and applied between steps, so the engine is only touched by one thread
at a time. Leaving the iterator early (break, aclose, task cancellation) aborts the request and
frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.errors import RequestFailedError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple[list[int], SamplingParams, str]] = []
        self._pending_aborts: list[str] = []
        self._lock = threading.Lock()
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestDelta]:
        """Yields RequestDelta objects until one has ``finished``. Raises InvalidRequestError (before
        the first delta) for a bad request; other requests are unaffected."""
        request_id = request_id or f"req-{next(self._ids)}"
        token_ids = self.engine.tokenize(prompt)
        self.engine.validate(token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request_id {request_id!r} already in flight")
            self._queues[request_id] = queue
            self._pending_adds.append((token_ids, params, request_id))
        self._ensure_loop()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:  # this request failed alone; the others go on
                    finished = True
                    raise RequestFailedError(request_id, item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.append(request_id)
            self._queues.pop(request_id, None)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._pending_adds and not self._pending_aborts and not self.engine.has_unfinished_requests()
            if idle:
                return
            try:
                deltas = await asyncio.to_thread(self._step)
            except Exception as e:  # an engine failure ends every stream with the error
                with self._lock:
                    queues, self._queues = list(self._queues.values()), {}
                for q in queues:
                    q.put_nowait(e)
                return
            for request_id, delta in deltas:
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(delta)
            await asyncio.sleep(0)  # let consumers run between steps

    def _step(self) -> list[tuple[str, RequestDelta]]:
        engine = self.engine
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        for token_ids, params, request_id in adds:
            engine.add_request(token_ids, params, request_id)
        for request_id in aborts:
            engine.abort_request(request_id)
        out = []
        for seq in engine.step():
            out.append((seq.request_id, engine.delta(seq)))
            if seq.is_finished:
                engine.pop_finished(seq.request_id)
        return out

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
