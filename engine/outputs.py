"""What the engine hands back for a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated tokens
    text: str = ""  # generated text (empty without a tokenizer), cut before any stop string
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Set when the request was rejected (nothing else is then meaningful) or failed inside a step
    # (the fields hold what it had produced before).
    error: str | None = None


@dataclass
class RequestDelta:
    """One streaming increment: the tokens and text produced since the previous delta."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None  # the request failed (finish_reason "error"): why
    # Only on the first delta, and only when asked (SamplingParams.prompt_logprobs): one entry per
    # prompt token, None for the first.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
