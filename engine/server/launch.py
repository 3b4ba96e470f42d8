"""Start the server: an AsyncLLM on the model, the app over it, uvicorn on host:port."""

from __future__ import annotations

from typing import Any

from engine.server.config import ServerConfig


def serve(model: str, config: ServerConfig | None = None, **engine_kwargs: Any) -> None:
    """Blocks until the server stops (Ctrl-C). ``engine_kwargs`` are EngineConfig fields."""
    import uvicorn

    from engine.async_llm import AsyncLLM
    from engine.server.app import build_app

    config = config or ServerConfig()
    llm = AsyncLLM(model, **engine_kwargs)
    app = build_app(llm, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
