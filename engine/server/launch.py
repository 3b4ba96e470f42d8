"""Start the server: an AsyncLLM on the model, the app over it, uvicorn on host:port."""

from __future__ import annotations

from typing import Any

from engine.async_llm import AsyncLLM
from engine.server.config import ServerConfig


def run_server(llm: AsyncLLM, config: ServerConfig) -> None:
    """Blocks until the server stops (Ctrl-C)."""
    import uvicorn

    from engine.server.app import build_app

    uvicorn.run(build_app(llm, config), host=config.host, port=config.port, log_level=config.log_level)


def serve(model: str, config: ServerConfig | None = None, **engine_kwargs: Any) -> None:
    """``engine_kwargs`` are EngineConfig fields."""
    run_server(AsyncLLM(model, **engine_kwargs), config or ServerConfig())
