"""The OpenAI-compatible HTTP server over ``AsyncLLM``.

    from engine.server import ServerConfig, build_app, serve
    serve("path/to/model", ServerConfig(port=8000), max_model_len=2048)   # blocks; engine kwargs after

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /tokenize, /detokenize,
/tokenizer_info, /metrics. One file per job: ``protocol`` (request models), ``errors`` (OpenAI's
error body), ``admission`` (API key, bounded queue), ``generation`` (fan-out of n, validation,
merged deltas), ``logprobs``, ``completions`` / ``chat`` (response shapes), ``respond`` (admit,
then stream or collect), ``streaming`` (SSE), ``metrics`` (Prometheus), ``app`` (routes),
``launch`` (uvicorn).
"""

from engine.server.app import build_app
from engine.server.config import ServerConfig
from engine.server.launch import run_server, serve

__all__ = ["ServerConfig", "build_app", "run_server", "serve"]
