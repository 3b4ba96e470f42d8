"""Per-request sampling parameters.

Constructing a SamplingParams never raises: validation happens when the request enters the
engine (``validate``), so that in one ``generate`` call a bad request fails alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from engine.errors import InvalidRequestError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # in [0, 1]
    seed: int | None = None  # per-request draws (sampler.SeededRows); None: the engine's global generator
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    stop: list[str] | str | None = None  # stop strings (need a tokenizer); excluded from text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (plus the chosen one); <= max_logprobs
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (from the 2nd on); <= max_logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self, vocab_size: int | None = None, max_logprobs: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field: every field is checked for its
        type (any integer or real type, numpy's included; never bool for a number) and range."""
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens!r}")
        _check_real("temperature", self.temperature, "must be >= 0", lambda v: v >= 0.0)
        _check_real("top_p", self.top_p, "must be in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_real("min_p", self.min_p, "must be in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_int("top_k", self.top_k, lo=-1)  # -1 and 0: off
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**64:  # the 64-bit words sampler.SeededRows hashes
                raise InvalidRequestError("seed", f"must fit in 64 bits, got {self.seed!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise InvalidRequestError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value, lo=0)
            if max_logprobs is not None and value > max_logprobs:
                raise InvalidRequestError(
                    name, f"{value} exceeds the engine's max_logprobs ({max_logprobs}); raise it with max_logprobs=N"
                )
            if vocab_size is not None and value > vocab_size:
                raise InvalidRequestError(name, f"{value} exceeds the vocabulary size ({vocab_size})")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidRequestError("stop_token_ids", f"must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        for t in self.stop_token_ids:
            if not is_integer(t) or (vocab_size is not None and not 0 <= t < vocab_size):
                raise InvalidRequestError("stop_token_ids", f"token id {t!r} is not an integer in [0, {vocab_size})")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise InvalidRequestError("stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {self.stop!r}")

    def with_python_scalars(self) -> SamplingParams:
        """After ``validate``: the same parameters with plain Python numbers (numpy's, or a
        Fraction, become int / float / bool, as the sampler expects);
        ``self`` when they already are."""
        changes: dict[str, object] = {}
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and type(value) is not int:
                changes[name] = int(value)
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if type(value) not in (int, float):
                changes[name] = float(value)
        if type(self.ignore_eos) is not bool:
            changes["ignore_eos"] = bool(self.ignore_eos)
        if any(type(t) is not int for t in self.stop_token_ids):
            changes["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        return replace(self, **changes) if changes else self


def is_integer(value: object) -> bool:
    """Any integer type (Python's, numpy's), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: object, lo: int | None = None) -> None:
    if not is_integer(value):
        raise InvalidRequestError(name, f"must be an integer, got {value!r} ({type(value).__name__})")
    if lo is not None and value < lo:
        raise InvalidRequestError(name, f"must be >= {lo}, got {value!r}")


def _check_real(name: str, value: object, rule: str, ok: Callable[[float], bool]) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(name, f"must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not ok(value):
        raise InvalidRequestError(name, f"{rule} and finite, got {value!r}")
