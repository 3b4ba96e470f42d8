"""Per-request sampling parameters.

Constructing a SamplingParams never raises: validation happens when the request enters the
engine (``validate``), so that in one ``generate`` call a bad request fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # in [0, 1]
    seed: int | None = None  # per-request generator; None: the engine's global one
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    stop: list[str] | str | None = None  # stop strings (need a tokenizer); excluded from text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (plus the chosen one)
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (from the 2nd on)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if self.temperature < 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1, 0 (off) or >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequestError(name, f"must be >= 0, got {value!r}")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise InvalidRequestError("stop_token_ids", f"token id {t} outside [0, {vocab_size})")
        if any(not s for s in self.stop_strings):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
