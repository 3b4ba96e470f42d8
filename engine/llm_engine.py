"""LLMEngine: requests in, one scheduled step at a time, finished outputs out.

A step is a prefill, a decode of one token per sequence, or (when the scheduler finds every
sequence plain greedy and nobody waiting) a multi-step decode of up to ``num_decode_steps`` tokens
per sequence. Its tokens are taken in order, exactly as that many single steps would take them:
a sequence that finishes on one of them drops the rest."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.model_runner import ModelRunner
from engine.outputs import RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _load_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _eos_ids(path: str, hf_config: Any, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    try:
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(path).eos_token_id)
    except (OSError, ValueError):
        pass
    add(getattr(hf_config, "eos_token_id", None))
    if not ids and tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, model: str, tokenizer: Any = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine option(s): {sorted(unknown)}")
        self.config = EngineConfig(model=model, **kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model)
        self.eos_token_ids = _eos_ids(model, self.config.hf_config, self.tokenizer)
        self.runner = ModelRunner(self.config)
        self.runner.eos_token_ids = set(self.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
            self.config.enable_chunked_prefill, self.config.num_decode_steps, self.config.max_model_len,
        )
        self.vocab_size = int(self.config.hf_config.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self.num_steps = 0
        self.num_multi_steps = 0  # of those, decode steps that ran several forwards

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model directory has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
        if len(token_ids) == 0:
            raise InvalidRequestError("prompt", "empty prompt")
        if len(token_ids) >= self.config.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(token_ids)} tokens; max_model_len is {self.config.max_model_len} (prompt + 1 token)"
            )
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in token_ids):
            raise InvalidRequestError("prompt", f"token ids must be ints in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer")

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue one request; raises InvalidRequestError (naming the field) if it is bad."""
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        seq = Sequence(token_ids, params, request_id)
        seq.stop_ids = self._stop_ids(seq)
        if seq.request_id in self.seqs:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one scheduled step. Returns the sequences that produced a token or finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if batch.num_steps > 1:
            return self._multi_step(batch)
        result = self.runner.run(batch)
        self.scheduler.finish_step(batch)
        touched: list[Sequence] = []
        finished = False
        for seq, token, lp in zip(batch.seqs, result.tokens, result.logprobs):
            if token is None:
                continue
            seq.append_token(token)
            if lp is not None:
                seq.logprobs.append(lp)
            finished |= self._check_stop(seq, token)
            touched.append(seq)
        if finished:  # a scan of the running list, needed only when someone finished
            self.scheduler.remove_finished()
        self.num_steps += 1
        return touched

    def _multi_step(self, batch) -> list[Sequence]:
        """A decode step that ran ``batch.num_steps`` forwards: every sequence takes its tokens in
        order until one finishes it. Tokens after that are dropped; the K/V they left in the
        sequence's blocks goes with the blocks when the finished sequence is freed."""
        result = self.runner.run(batch)
        finished = False
        for seq, tokens in zip(batch.seqs, result.step_tokens):
            kept, done = self._append_steps(seq, tokens)
            self.scheduler.finish_decode_steps(seq, kept)
            finished |= done
        if finished:
            self.scheduler.remove_finished()
        self.num_steps += 1
        self.num_multi_steps += 1
        return list(batch.seqs)

    def _append_steps(self, seq: Sequence, tokens: list[int]) -> tuple[int, bool]:
        """Append ``tokens`` (one per step) until one finishes ``seq``: (tokens kept, finished)."""
        if seq.params.stop_strings:  # text decides: check token by token, as single steps would
            for j, token in enumerate(tokens):
                seq.append_token(token)
                if self._check_stop(seq, token):
                    return j + 1, True
            return len(tokens), False
        # Otherwise only a stop token or a length limit can end it: find the first in bulk, then
        # let _check_stop judge the last kept token (it finishes the sequence, or none did).
        n = len(seq.token_ids)
        kept = min(len(tokens), seq.params.max_tokens - (n - seq.num_prompt_tokens), self.config.max_model_len - n)
        stops = seq.stop_ids if seq.stop_ids is not None else self._stop_ids(seq)
        if stops and not stops.isdisjoint(tokens[:kept]):
            kept = next(j for j, t in enumerate(tokens) if t in stops) + 1
        seq.token_ids.extend(tokens[:kept])
        return kept, self._check_stop(seq, tokens[kept - 1])

    def _stop_ids(self, seq: Sequence) -> frozenset[int]:
        eos = frozenset() if seq.params.ignore_eos else frozenset(self.eos_token_ids)
        return frozenset(seq.params.stop_token_ids) | eos

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Finish ``seq`` if ``token`` ends it; returns whether it did. Stop strings (the only
        check that decodes text) are looked at only for requests that have them."""
        params = seq.params
        reason: str | None = None
        if token in self.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        elif params.stop_token_ids and token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        if params.stop is not None and params.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            # Only the tail can hold a new match: search from where the previous text ended.
            tail_start = max(0, len(seq.output_text) - max(len(s) for s in params.stop_strings))
            hits = [(text.find(s, tail_start), s) for s in params.stop_strings]
            hits = [(i, s) for i, s in hits if i >= 0]
            seq.output_text = text
            if hits and reason is None:
                i, s = min(hits)
                seq.output_text = text[:i]
                reason, seq.stop_reason = "stop", s
        if reason is None:
            n = len(seq.token_ids)
            if n - seq.num_prompt_tokens >= params.max_tokens or n >= self.config.max_model_len:
                reason = "length"
        if reason is None:
            return False
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return True

    # -- outputs -------------------------------------------------------------------------------
    def detokenize(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        if seq.params.stop_strings:
            return seq.output_text
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)

    def output(self, seq: Sequence) -> RequestOutput:
        seq.output_text = self.detokenize(seq)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=seq.output_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def delta(self, seq: Sequence) -> RequestDelta:
        """Tokens and text since the last delta. Text that may still change (an incomplete UTF-8
        character, or a possible start of a stop string) is held back until it settles."""
        text = self.detokenize(seq)
        ready = len(text)
        if not seq.is_finished:
            if text.endswith("\ufffd"):
                ready = len(text.rstrip("\ufffd"))
            if seq.params.stop_strings:
                ready = min(ready, max(0, len(text) - max(len(s) for s in seq.params.stop_strings) + 1))
        ready = max(ready, seq.num_returned_chars)
        first = seq.num_returned_tokens == 0 and seq.num_returned_chars == 0
        new_tokens = seq.output_token_ids[seq.num_returned_tokens :]
        new_lp = seq.logprobs[seq.num_returned_tokens :] if seq.params.logprobs is not None else None
        delta = RequestDelta(
            request_id=seq.request_id,
            token_ids=new_tokens,
            text=text[seq.num_returned_chars : ready],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=new_lp,
            prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
        )
        seq.num_returned_tokens += len(new_tokens)
        seq.num_returned_chars = ready
        return delta

    def pop_finished(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)
