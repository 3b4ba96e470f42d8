"""Rank 0 -> workers: one message per step in shared memory, one event per worker.

Rank 0 writes [length | pickle] into the buffer and sets every worker's event; a worker reads the
message, then clears its event. Rank 0 writes the next message only once every event is clear, so
no worker can read a message half overwritten. Waiting workers wake twice a second to see whether
rank 0's process is still alive: a worker never outlives the engine."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import struct
import time
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable

_HEADER = struct.Struct("<q")
POLL_S = 0.5


class WorkerExited(RuntimeError):
    """A tensor-parallel worker process is gone."""


class StepChannel:
    def __init__(self, ctx: Any, num_workers: int, nbytes: int) -> None:
        self.shm = SharedMemory(create=True, size=nbytes)
        self.name, self.nbytes = self.shm.name, nbytes
        self.events = [ctx.Event() for _ in range(num_workers)]
        self._owner = True

    def __getstate__(self) -> dict:  # sent to the spawned workers: they attach by name
        return {"name": self.name, "nbytes": self.nbytes, "events": self.events}

    def __setstate__(self, state: dict) -> None:
        self.name, self.nbytes, self.events = state["name"], state["nbytes"], state["events"]
        self.shm = SharedMemory(name=self.name)
        self._owner = False

    def send(self, message: Any, alive: Callable[[], None], timeout_s: float | None = None) -> None:
        """Rank 0: publish ``message`` once every worker read the last one; ``alive()`` raises
        WorkerExited if a worker died meanwhile; TimeoutError after ``timeout_s``."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if _HEADER.size + len(data) > self.nbytes:
            raise ValueError(f"a step message of {len(data)} bytes exceeds the {self.nbytes}-byte channel")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        alive()
        while any(e.is_set() for e in self.events):
            alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("tensor-parallel workers did not read the last step")
            time.sleep(1e-5)
        buf = self.shm.buf
        _HEADER.pack_into(buf, 0, len(data))
        buf[_HEADER.size : _HEADER.size + len(data)] = data
        for e in self.events:
            e.set()

    def receive(self, worker: int) -> Any | None:
        """Worker ``worker`` (0-based): the next message, or None once rank 0's process is gone."""
        event, parent = self.events[worker], mp.parent_process()
        while not event.wait(POLL_S):
            if parent is not None and not parent.is_alive():
                return None
        (n,) = _HEADER.unpack_from(self.shm.buf, 0)
        message = pickle.loads(self.shm.buf[_HEADER.size : _HEADER.size + n])
        event.clear()
        return message

    def close(self) -> None:
        self.shm.close()
        if self._owner:
            self.shm.unlink()
