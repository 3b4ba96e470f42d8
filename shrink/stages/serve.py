"""stage=serve: the engine's OpenAI-compatible server on a model directory (blocks until stopped)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import ShrinkError
from shrink.context import StageContext
from shrink.stages import register_stage

ENGINE_KEYS = ("engine", "speculative_config")


def server_settings(cfg: DictConfig):
    """(model dir, ServerConfig, engine kwargs) from the composed config; a bad value is a ShrinkError."""
    from engine.server import ServerConfig

    model = Path(str(cfg.model))
    if not (model / "config.json").is_file():
        raise ShrinkError(f"model: {model} is not a model directory (no config.json)")
    serve = OmegaConf.to_container(cfg.serve, resolve=True)
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(serve) - known - set(ENGINE_KEYS))
    if unknown:
        raise ShrinkError(f"serve.{unknown[0]}: unknown key; known: {', '.join(sorted(known | set(ENGINE_KEYS)))}")
    try:
        server = ServerConfig(**{k: v for k, v in serve.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ShrinkError(str(e)) from None
    engine_kwargs = {k: v for k, v in (serve.get("engine") or {}).items() if v is not None}
    if serve.get("speculative_config") is not None:
        engine_kwargs["speculative_config"] = serve["speculative_config"]
    engine_kwargs.setdefault("device", str(cfg.device))
    engine_kwargs.setdefault("seed", int(cfg.seed))
    return model, server, engine_kwargs


@register_stage("serve")
def run(cfg: DictConfig, ctx: StageContext) -> None:
    from engine.async_llm import AsyncLLM
    from engine.server import run_server

    model, server, engine_kwargs = server_settings(cfg)
    try:
        llm = AsyncLLM(str(model), **engine_kwargs)
    except (TypeError, ValueError) as e:  # a bad engine value, or an option it lacks (speculative_config today)
        raise ShrinkError(f"serve.engine: {e}") from None
    run_server(llm, server)
