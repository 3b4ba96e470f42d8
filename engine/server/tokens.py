"""/tokenize, /detokenize and /tokenizer_info, as vLLM answers them (lm-eval's remote tokenizer
reads these)."""

from __future__ import annotations

from fastapi import Request

from engine.server.chat import chat_prompt_ids
from engine.server.errors import APIError, parse_body
from engine.server.protocol import DetokenizeRequest, TokenizeRequest
from engine.server.state import ServerState


async def tokenize(http: Request, state: ServerState) -> dict:
    req = await parse_body(http, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt)
    else:
        tok = state.need_tokenizer("/tokenize")
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


async def detokenize(http: Request, state: ServerState) -> dict:
    req = await parse_body(http, DetokenizeRequest)
    state.check_model(req.model)
    tok = state.need_tokenizer("/detokenize")
    vocab = state.llm.engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: {bad[0]} is outside [0, {vocab})", param="tokens")
    return {"prompt": tok.decode(req.tokens)}


def tokenizer_info(state: ServerState) -> dict:
    tok = state.need_tokenizer("/tokenizer_info")
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": state.max_model_len, "vocab_size": state.llm.engine.vocab_size,
    }
