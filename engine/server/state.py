"""What every route needs: the engine, the server's config, metrics, admission, model names."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from engine.async_llm import AsyncLLM
from engine.server.admission import Admission
from engine.server.config import ServerConfig
from engine.server.errors import APIError
from engine.server.logprobs import TokenText
from engine.server.metrics import ServerMetrics


@dataclass
class ServerState:
    llm: AsyncLLM
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics
    admission: Admission
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, llm: AsyncLLM, config: ServerConfig) -> ServerState:
        engine = llm.engine
        name = config.served_model_name or os.path.basename(os.path.normpath(engine.config.model))
        bm, sched = engine.block_manager, engine.scheduler
        metrics = ServerMetrics(
            name,
            num_running=lambda: len(sched.running),
            num_waiting=lambda: len(sched.waiting),
            kv_cache_usage=lambda: 1.0 - bm.num_free_blocks / bm.num_blocks,
        )
        admission = Admission(engine.config.max_num_seqs, config.max_queue, config.retry_after_s)
        return cls(llm, config, name, metrics, admission, TokenText(engine.tokenizer))

    @property
    def tokenizer(self):
        return self.llm.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.llm.engine.config.max_model_len)

    def check_model(self, model: str | None) -> None:
        """The request's model must be ours (by served name or path); None means ours."""
        if model is None or model in (self.model_name, self.llm.engine.config.model):
            return
        raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                       param="model", code="model_not_found")

    def need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this model directory has none")
        return self.tokenizer
