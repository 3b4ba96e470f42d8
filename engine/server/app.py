"""The FastAPI application: routes only; each route's work lives in its own module."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from engine.async_llm import AsyncLLM
from engine.server.admission import APIKeyCheck
from engine.server.chat import create_chat_completion
from engine.server.completions import create_completion
from engine.server.config import ServerConfig
from engine.server.errors import install_handlers
from engine.server.state import ServerState
from engine.server.tokens import detokenize, tokenize, tokenizer_info


def build_app(llm: AsyncLLM, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    state = ServerState.create(llm, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await llm.shutdown()

    app = FastAPI(title="shrink", lifespan=lifespan)
    app.state.server = state
    install_handlers(app)

    open_routes = APIRouter()

    @open_routes.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @open_routes.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    keyed = APIRouter(dependencies=[Depends(APIKeyCheck(config.api_key))])

    @keyed.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "shrink",
            "root": llm.engine.config.model, "max_model_len": state.max_model_len,
        }]}

    @keyed.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state)

    @keyed.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, state)

    @keyed.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        return await tokenize(request, state)

    @keyed.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        return await detokenize(request, state)

    @keyed.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict:
        return tokenizer_info(state)

    app.include_router(open_routes)
    app.include_router(keyed)
    return app
