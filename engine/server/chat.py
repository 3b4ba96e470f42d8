"""POST /v1/chat/completions: the tokenizer's chat template, n choices, logprobs, streaming."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from engine.server.errors import APIError, parse_body
from engine.server.generation import Choice, ChoiceResult, fan_out, merged_deltas, validate
from engine.server.logprobs import chat_logprobs
from engine.server.protocol import ChatCompletionRequest, ChatMessage
from engine.server.sampling import check_limits, max_tokens_for, sampling_params
from engine.server.state import ServerState
from engine.server.respond import respond


def chat_prompt_ids(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """The conversation through the tokenizer's chat template, as token ids (the template writes
    the special tokens itself, so none are added on top)."""
    tok = state.need_tokenizer("a chat request")
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        text = tok.apply_chat_template([m.as_template_dict() for m in messages],
                                       add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may raise on any message it dislikes
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
    return tok.encode(text, add_special_tokens=False)


class ChatRun:
    def __init__(self, req: ChatCompletionRequest, state: ServerState) -> None:
        state.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None
        check_limits(req, state.config, self.top_n, "top_logprobs")
        self.req, self.state = req, state
        self.prompt_ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt)
        max_tokens = max_tokens_for(req.token_limit, len(self.prompt_ids), state.max_model_len)
        self.choices: list[Choice] = fan_out([(self.prompt_ids, sampling_params(req, max_tokens, self.top_n))], req.n)
        validate(state.llm, self.choices)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _logprobs(self, token_ids: list[int], entries) -> dict | None:
        if self.top_n is None:
            return None
        return chat_logprobs(self.state.token_text, token_ids, entries or [], self.top_n)

    def _usage(self, num_generated: int) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": num_generated, "total_tokens": n + num_generated}

    def body(self, results: list[ChoiceResult]) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": r.text},
                    "logprobs": self._logprobs(r.token_ids, r.logprobs), "finish_reason": r.finish_reason}
                   for c, r in zip(self.choices, results)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self._usage(sum(len(r.token_ids) for r in results))}

    @property
    def stream(self) -> bool:
        return self.req.stream

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": usage}

    async def chunks(self) -> AsyncIterator[dict]:
        for c in self.choices:  # OpenAI's first chunk of each choice names the role
            yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])
        generated = 0
        async with aclosing(merged_deltas(self.state.llm, self.state.metrics, self.id, self.choices)) as deltas:
            async for index, delta in deltas:
                generated += len(delta.token_ids)
                if not delta.text and not delta.finished and self.top_n is None:
                    continue
                yield self._chunk([{"index": index, "delta": {"content": delta.text} if delta.text else {},
                                    "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
                                    "finish_reason": delta.finish_reason if delta.finished else None}])
        if self.req.include_usage:
            yield self._chunk([], self._usage(generated))


async def create_chat_completion(http: Request, state: ServerState) -> Response:
    return await respond(http, state, ChatRun(await parse_body(http, ChatCompletionRequest), state))
