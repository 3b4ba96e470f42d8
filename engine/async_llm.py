"""Streaming interface for the server: one async iterator of deltas per request, cancellable.

The engine steps in a worker thread (a step blocks on the GPU); requests and aborts arriving on
the event loop are queued and applied between steps, so the engine is only touched by one thread
at a time. Leaving the iterator early (break, aclose, task cancellation) aborts the request and
frees its blocks. When a stream ends, its request_id is free again at once: inside the engine
each stream runs under its own id (request_id plus a serial number), so that a delta of an
aborted stream still in flight can never reach a new stream of the same request_id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.errors import InvalidRequestError, RequestFailedError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)
        self._engine_ids: dict[str, str] = {}  # request_id of an open stream -> its id in the engine
        self._queues: dict[str, asyncio.Queue] = {}  # engine id -> its stream's queue
        self._pending_adds: list[tuple[list[int], SamplingParams, str]] = []  # by engine id
        self._pending_aborts: list[str] = []  # engine ids
        self._lock = threading.Lock()
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._serials = itertools.count()

    @property
    def active_request_ids(self) -> set[str]:
        """The request_ids whose streams are open."""
        with self._lock:
            return set(self._engine_ids)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestDelta]:
        """Yields RequestDelta objects until one has ``finished``. Raises InvalidRequestError (before
        the first delta) for a bad request or a request_id whose stream is still open, and
        RequestFailedError if the request fails inside a step; other requests are unaffected."""
        request_id = request_id or f"req-{next(self._ids)}"
        token_ids, params = self.engine.prepare(prompt, params)
        engine_id = f"{request_id}#{next(self._serials)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._engine_ids:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
            self._engine_ids[request_id] = engine_id
            self._queues[engine_id] = queue
            self._pending_adds.append((token_ids, params, engine_id))
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
                yield dataclasses.replace(item, request_id=request_id)
                if item.finished:
                    finished = True
                    return
        finally:
            self._close(request_id, engine_id, abort=not finished)

    def abort(self, request_id: str) -> None:
        """Abort the request: its stream ends with a finished delta (``finish_reason == "abort"``)."""
        with self._lock:
            engine_id = self._engine_ids.get(request_id)
            queue = self._queues.get(engine_id) if engine_id is not None else None
        if engine_id is None:
            return
        self._close(request_id, engine_id, abort=True)
        if queue is not None:
            queue.put_nowait(RequestDelta(request_id, [], "", finished=True, finish_reason="abort"))

    def _close(self, request_id: str, engine_id: str, abort: bool) -> None:
        """Forget a stream; with ``abort``, take its request out of the engine (or never add it)."""
        with self._lock:
            self._queues.pop(engine_id, None)
            if self._engine_ids.get(request_id) == engine_id:
                del self._engine_ids[request_id]
            if abort:
                queued = len(self._pending_adds)
                self._pending_adds = [a for a in self._pending_adds if a[2] != engine_id]
                if len(self._pending_adds) == queued:  # already in the engine
                    self._pending_aborts.append(engine_id)

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
                    queues = list(self._queues.values())
                for q in queues:
                    q.put_nowait(e)
                return
            for engine_id, delta in deltas:
                queue = self._queues.get(engine_id)
                if queue is not None:
                    queue.put_nowait(delta)
            await asyncio.sleep(0)  # let consumers run between steps

    def _step(self) -> list[tuple[str, RequestDelta | Exception]]:
        """Apply queued aborts and adds, run one step; returns (engine id, delta or error) pairs."""
        engine = self.engine
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        for engine_id in aborts:
            engine.abort_request(engine_id)
        out: list[tuple[str, RequestDelta | Exception]] = []
        for token_ids, params, engine_id in adds:
            try:
                engine.add_prepared(token_ids, params, engine_id)
            except Exception as e:  # this stream alone
                out.append((engine_id, e))
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
