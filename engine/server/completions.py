"""POST /v1/completions: prompts as text or token ids, n choices each, echo, logprobs, streaming.

``max_tokens: 0`` is "echo only" (older lm-eval scores prompts that way): the engine runs one
token, which is dropped. With ``echo`` and ``logprobs`` the prompt's logprobs come first (None for
its first token), which is what lm-eval's loglikelihood requests sum."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from engine.errors import InvalidRequestError
from engine.server.errors import APIError, parse_body
from engine.server.generation import Choice, ChoiceResult, fan_out, merged_deltas, validate
from engine.server.logprobs import CompletionLogprobs
from engine.server.protocol import CompletionRequest
from engine.server.sampling import check_limits, max_tokens_for, sampling_params
from engine.server.state import ServerState
from engine.server.respond import respond


class Prompt:
    def __init__(self, token_ids: list[int], text: str | None) -> None:
        self.token_ids = token_ids
        self._text = text

    def text(self, state: ServerState) -> str:
        """The prompt as text (decoded when it came as token ids)."""
        if self._text is None:
            tok = state.tokenizer
            self._text = tok.decode(self.token_ids) if tok is not None else ""
        return self._text


def _prompts(req: CompletionRequest, state: ServerState) -> list[Prompt]:
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]  # one prompt
    if not raw:
        raise APIError(400, "prompt: empty list", param="prompt")
    prompts = []
    for p in raw:
        try:
            ids = state.llm.engine.tokenize(p)
        except InvalidRequestError as e:
            raise APIError.from_invalid_request(e) from None
        prompts.append(Prompt(ids, p if isinstance(p, str) else None))
    return prompts


class CompletionRun:
    """One /v1/completions request, validated and ready to run."""

    def __init__(self, req: CompletionRequest, state: ServerState) -> None:
        state.check_model(req.model)
        check_limits(req, state.config, req.logprobs, "logprobs")
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server; leave it unset", param="suffix")
        self.req, self.state = req, state
        self.prompts = _prompts(req, state)
        self.echo_only = req.max_tokens == 0
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        per_prompt = [(p.token_ids, sampling_params(req, max_tokens_for(req.max_tokens, len(p.token_ids), state.max_model_len),
                                                    req.logprobs, prompt_logprobs)) for p in self.prompts]
        self.choices: list[Choice] = fan_out(per_prompt, req.n)
        validate(state.llm, self.choices)
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _logprobs(self, choice: Choice) -> CompletionLogprobs:
        prompt = self.prompts[choice.prompt_index]
        offset = 0 if self.req.echo else len(prompt.text(self.state))
        return CompletionLogprobs(self.state.token_text, offset)

    def _add(self, lp: CompletionLogprobs | None, choice: Choice, first: bool, token_ids: list[int],
             entries, prompt_entries) -> str:
        """Add this part's logprobs; returns the echo text to put before it ("" after the first part)."""
        echo = ""
        if first and self.req.echo:
            echo = self.prompts[choice.prompt_index].text(self.state)
            if lp is not None:
                lp.add(choice.prompt_ids, prompt_entries or [None] * len(choice.prompt_ids), self.req.logprobs)
        if lp is not None and not self.echo_only:
            lp.add(token_ids, entries or [], self.req.logprobs)
        return echo

    def _finish_reason(self, reason: str | None) -> str | None:
        return "length" if self.echo_only and reason is not None else reason

    def _usage(self, num_generated: int) -> dict:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = 0 if self.echo_only else num_generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(self, results: list[ChoiceResult]) -> dict:
        choices = []
        for choice, r in zip(self.choices, results):
            lp = self._logprobs(choice) if self.req.logprobs is not None else None
            echo = self._add(lp, choice, True, r.token_ids, r.logprobs, r.prompt_logprobs)
            text = echo + ("" if self.echo_only else r.text)
            choices.append({"index": choice.index, "text": text, "logprobs": lp.take() if lp else None,
                            "finish_reason": self._finish_reason(r.finish_reason)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self._usage(sum(len(r.token_ids) for r in results))}

    @property
    def stream(self) -> bool:
        return self.req.stream

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": usage}

    async def chunks(self) -> AsyncIterator[dict]:
        want_lp = self.req.logprobs is not None
        lps = {c.index: self._logprobs(c) for c in self.choices} if want_lp else {}
        started: set[int] = set()
        generated = 0
        async with aclosing(merged_deltas(self.state.llm, self.state.metrics, self.id, self.choices)) as deltas:
            async for index, delta in deltas:
                choice = self.choices[index]
                generated += len(delta.token_ids)
                lp = lps.get(index)
                echo = self._add(lp, choice, index not in started, delta.token_ids, delta.logprobs, delta.prompt_logprobs)
                started.add(index)
                text = echo + ("" if self.echo_only else delta.text)
                lp_part = lp.take() if lp is not None else None
                if not text and not (lp_part and lp_part["tokens"]) and not delta.finished:
                    continue
                finish = self._finish_reason(delta.finish_reason) if delta.finished else None
                yield self._chunk([{"index": index, "text": text, "logprobs": lp_part, "finish_reason": finish}])
        if self.req.include_usage:
            yield self._chunk([], self._usage(generated))


async def create_completion(http: Request, state: ServerState) -> Response:
    return await respond(http, state, CompletionRun(await parse_body(http, CompletionRequest), state))
