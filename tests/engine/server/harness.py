"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, over an AsyncLLM on a tiny model.

A module of its own (not conftest.py), so tests import it by name."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from engine.async_llm import AsyncLLM
from engine.server import ServerConfig, build_app


class ServerThread:
    def __init__(self, model: str, config: ServerConfig | None = None, **engine_kwargs: Any) -> None:
        engine_kwargs = {"device": "cpu", "max_model_len": 256, "block_size": 4, **engine_kwargs}
        self.llm = AsyncLLM(model, **engine_kwargs)
        self.config = config or ServerConfig(port=0)
        self.app = build_app(self.llm, self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server

    def pool_is_full(self) -> bool:
        bm = self.llm.engine.block_manager
        return bm.num_free_blocks == bm.num_blocks

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once the engine has no request left and every block is free again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.llm.engine.has_unfinished_requests() and self.pool_is_full() \
                    and self.state.admission.in_flight == 0:
                return True
            time.sleep(0.02)
        return False


def slow_steps(server: ServerThread, seconds: float) -> None:
    """Make every engine step take at least ``seconds`` longer, so that a test can act while
    requests are still running (a tiny model on CPU finishes hundreds of tokens in a blink)."""
    engine = server.llm.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step
