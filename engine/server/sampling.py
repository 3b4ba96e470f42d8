"""From a request's sampling fields to the engine's SamplingParams, with the server's own limits."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.server.config import ServerConfig
from engine.server.errors import APIError
from engine.server.protocol import SamplingFields


def check_limits(req: SamplingFields, config: ServerConfig, logprobs: int | None, logprobs_field: str) -> None:
    field = req.unsupported()
    if field is not None:
        raise APIError(400, f"{field} is not supported by this server; leave it unset", param=field)
    if req.n > config.max_n:
        raise APIError(400, f"n: {req.n} choices requested; this server allows at most {config.max_n}", param="n")
    if logprobs is not None and logprobs > config.max_logprobs:
        raise APIError(400, f"{logprobs_field}: {logprobs} requested; this server returns at most "
                       f"{config.max_logprobs}", param=logprobs_field)


def max_tokens_for(limit: int | None, num_prompt_tokens: int, max_model_len: int) -> int:
    """The engine's max_tokens: the request's, or what the context has left; at least 1 (a
    request for 0 tokens runs one and drops it: "echo only")."""
    if limit is None:
        limit = max_model_len - num_prompt_tokens
    return max(1, limit)


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )
