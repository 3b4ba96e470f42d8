"""What the server itself is configured with (the engine has its own EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port
    api_key: str | None = None  # when set, every route but /health and /metrics needs "Bearer <key>"
    # Engine requests admitted beyond the engine's max_num_seqs (running) before answering 429.
    max_queue: int = 256
    retry_after_s: int = 1  # the Retry-After of a 429
    max_n: int = 16  # choices per request
    max_logprobs: int = 20  # top logprobs per token
    served_model_name: str | None = None  # default: the model directory's name
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port: {self.port} is not in [0, 65535]")
        for name in ("max_queue", "retry_after_s", "max_logprobs"):
            if getattr(self, name) < 0:
                raise ValueError(f"serve.{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_n < 1:
            raise ValueError(f"serve.max_n: must be >= 1, got {self.max_n}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("serve.api_key: empty; leave it null for no key")
