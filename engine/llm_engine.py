"""LLMEngine: requests in, one scheduled step at a time, finished outputs out.

A step is a prefill, a decode of one token per sequence, or (when the scheduler finds every
sequence plain greedy and nobody waiting) a multi-step decode of up to ``num_decode_steps`` tokens
per sequence. Every step gives each sequence a list of new tokens, taken in order exactly as that
many single steps would take them: a sequence that finishes on one of them drops the rest.

With ``speculative_config`` a decode step of few enough sequences is a speculative one
(engine/spec_decode/worker.py): a drafter proposes tokens, the target verifies them in one forward,
and each sequence gets the accepted tokens plus the target's own, appended the same way."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import fields, replace
from itertools import repeat
from typing import Any, Union

import numpy as np
import torch

from common.medusa import MedusaHeads
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.model_runner import ModelRunner
from engine.outputs import RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams, is_integer
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode.config import SpeculativeConfig, draft_engine_config, kv_bytes_per_token_of
from engine.spec_decode.draft_model import DraftModelProposer
from engine.spec_decode.draft_vocab import draft_vocab_ids
from engine.spec_decode.medusa import MedusaProposer, load_medusa_heads
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.metrics import SpecDecodeMetrics
from engine.spec_decode.worker import SpecDecodeWorker
from engine.tokenizer import load_tokenizer


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


# What a prompt may be: text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
Prompt = Union[str, list[int], tuple[int, ...], np.ndarray, Mapping[str, Any]]


class LLMEngine:
    def __init__(self, model: str, tokenizer: Any = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine option(s): {sorted(unknown)}")
        self.config = EngineConfig(model=model, **kwargs)
        model = self.config.model  # a .gguf file's converted directory
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.eos_token_ids = _eos_ids(model, self.config.hf_config, self.tokenizer)
        spec: SpeculativeConfig | None = self.config.speculative_config
        # The draft's vocabulary and positions (Medusa heads: every tensor, sizes, vocabulary) are
        # checked before either model is built.
        medusa = spec is not None and spec.method == "medusa"
        heads = load_medusa_heads(self.config, self.tokenizer, spec) if medusa else None
        model_drafter = spec is not None and spec.method == "draft_model"
        draft_config = draft_engine_config(self.config, self.tokenizer, spec) if model_drafter else None
        draft_vocab = None if draft_config is None else draft_vocab_ids(spec, draft_config.hf_config, self.tokenizer,
                                                                        self.eos_token_ids)  # its LM head's rows
        extra = kv_bytes_per_token_of(draft_config) if draft_config is not None else 0
        # Verify graphs for the largest speculative batch that graphs hold (16 sequences, k + 1 each).
        verify_tokens = min(spec.max_batch_size, 16) * (spec.num_speculative_tokens + 1) if spec else 0
        self.runner = ModelRunner(self.config, self.eos_token_ids, extra_kv_bytes_per_token=extra,
                                  verify_max_tokens=verify_tokens,
                                  verify_query_len=spec.num_speculative_tokens + 1 if spec else 0)
        self.draft_runner: ModelRunner | None = None
        self.spec_worker = self._spec_worker(spec, draft_config, draft_vocab, heads)
        rounds = self.spec_worker.rounds if self.spec_worker is not None else None  # num_rounds > 1
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching,
                                          keep_prompt_logprobs=not self.config.batch_invariant)
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
            self.config.enable_chunked_prefill, self.config.num_decode_steps, self.config.max_model_len,
            spec_k=self.spec_worker.k_for_step if self.spec_worker is not None else None,
            spec_rounds=rounds.rounds_for_step if rounds is not None else None,
        )
        self.vocab_size = int(self.config.hf_config.vocab_size)
        self.max_model_len = self.config.max_model_len
        self.seqs: dict[str, Sequence] = {}
        self.num_steps = 0
        self.num_multi_steps = 0  # of those, decode steps that ran several forwards
        self.num_spec_steps = 0  # of those, speculative decode steps

    def _spec_worker(self, spec: SpeculativeConfig | None, draft_config: EngineConfig | None,
                     draft_vocab: torch.Tensor | None = None,
                     heads: MedusaHeads | None = None) -> SpecDecodeWorker | None:
        if spec is None:
            return None
        if heads is not None:  # drafting through the target's own hidden states and LM head
            return SpecDecodeWorker(self.runner, MedusaProposer(self.runner, heads, self.eos_token_ids, spec),
                                    self.eos_token_ids, spec)
        if draft_config is None:
            return SpecDecodeWorker(self.runner, NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max),
                                    self.eos_token_ids, spec)
        # Same pool size: every block id of a sequence's table exists in both caches.
        self.draft_runner = ModelRunner(replace(draft_config, num_kv_blocks=self.runner.num_blocks), self.eos_token_ids,
                                        lm_head_rows=draft_vocab)
        proposer = DraftModelProposer(self.draft_runner, self.eos_token_ids)
        return SpecDecodeWorker(self.runner, proposer, self.eos_token_ids, spec)

    def close(self) -> None:
        """Stop the tensor-parallel workers (they also stop at exit, or when this process is gone)."""
        self.runner.close()

    @property
    def spec_metrics(self) -> SpecDecodeMetrics | None:
        """Acceptance counters and draft/verify time of the speculative steps (None without speculation)."""
        return self.spec_worker.metrics if self.spec_worker is not None else None

    def stats(self) -> dict[str, Any]:
        """Step counters, preemptions and, with speculation, its metrics (SpecDecodeWorker.stats:
        SpecDecodeMetrics.as_dict, and under ``auto`` the policy's chosen k and step costs)."""
        out: dict[str, Any] = {"num_steps": self.num_steps, "num_multi_steps": self.num_multi_steps,
                               "num_spec_steps": self.num_spec_steps, "num_preemptions": self.scheduler.num_preemptions}
        if self.spec_worker is not None:
            out["spec_decode"] = self.spec_worker.stats()
        return out

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, from any form vLLM users write: text, token ids (any integer
        type, numpy's included), ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``."""
        if isinstance(prompt, Mapping):
            keys = set(prompt)
            if keys == {"prompt"}:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    raise InvalidRequestError("prompt", f"'prompt' must be text, got {type(prompt).__name__}")
            elif keys == {"prompt_token_ids"}:
                prompt = prompt["prompt_token_ids"]
                if isinstance(prompt, str):
                    raise InvalidRequestError("prompt", "'prompt_token_ids' must be token ids, got text")
            else:
                raise InvalidRequestError(
                    "prompt", f"a dict prompt has one key, 'prompt' or 'prompt_token_ids'; got {sorted(map(str, keys))}"
                )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model directory has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise InvalidRequestError(
                "prompt", f"expected text, token ids or a {{'prompt': ...}} dict, got {type(prompt).__name__}"
            )
        token_ids = list(prompt)
        if all(type(t) is int for t in token_ids):  # the common case: no isinstance (ABC) check per token
            return token_ids
        bad = next((t for t in token_ids if not is_integer(t)), None)
        if bad is not None:
            raise InvalidRequestError("prompt", f"token ids must be integers, got {bad!r}")
        return [int(t) for t in token_ids]

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            hint = "; write SamplingParams(**params)" if isinstance(params, Mapping) else ""
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}{hint}")
        if len(token_ids) == 0:
            raise InvalidRequestError("prompt", "empty prompt")
        if len(token_ids) >= self.config.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(token_ids)} tokens; max_model_len is {self.config.max_model_len} (prompt + 1 token)"
            )
        if any(t < 0 or t >= self.vocab_size for t in token_ids):
            raise InvalidRequestError("prompt", f"token ids must be in [0, {self.vocab_size})")
        params.validate(self.vocab_size, self.config.max_logprobs)
        if params.stop_strings and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer")

    def prepare(self, prompt: Prompt, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params to run it with (numpy scalars made Python ones),
        once both are known good; raises InvalidRequestError (naming the field) if they are not.
        Adds nothing."""
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        return token_ids, params.with_python_scalars()

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue one request; raises InvalidRequestError (naming the field) if it is bad."""
        return self.add_prepared(*self.prepare(prompt, params), request_id)

    def add_prepared(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request whose token ids and params came from ``prepare``."""
        seq = Sequence(token_ids, params, request_id)
        if seq.request_id in self.seqs:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        seq.stop_ids = self._stop_ids(seq)
        # Stop strings: text decides at any token, so every token goes through _check_stop.
        seq.stop_len = 0 if params.stop_strings else min(seq.num_prompt_tokens + params.max_tokens, self.max_model_len)
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
        """Run one scheduled step. Returns the sequences that produced a token or finished.

        What belongs to one request (taking its tokens and logprobs, its stop check with any
        detokenization) is isolated: a failure there finishes that request alone with
        ``finish_reason == "error"`` and the step goes on. A failure of ``runner.run`` (the batched
        forward and sampling) is an engine failure: it propagates and fails the step."""
        began = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if batch.num_draft is not None:
            result = self.spec_worker.step(batch)
            self.num_spec_steps += 1
        else:
            result = self.runner.run(batch)
        touched: list[Sequence] = []
        num_new: list[int] = []
        finished = False
        for seq, tokens, logprobs in zip(batch.seqs, result.tokens, result.logprobs or repeat(None)):
            before = len(seq.token_ids)
            try:
                kept, done = self._append(seq, tokens, logprobs)
            except Exception as e:  # this request's tokens, logprobs or stop check: it fails alone
                self._fail(seq, e)
                kept, done = len(seq.token_ids) - before, True
            num_new.append(kept)
            finished |= done
            if kept or done:
                touched.append(seq)
        self.scheduler.finish_step(batch, num_new)
        if finished:  # a scan of the running list, needed only when someone finished
            self.scheduler.remove_finished()
        self.num_steps += 1
        self.num_multi_steps += batch.num_steps > 1
        if self.spec_worker is not None:  # the auto policy weighs what its steps really took
            self.spec_worker.record_step(batch, time.perf_counter() - began, num_new)
        return touched

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list | None) -> tuple[int, bool]:
        """Append ``tokens`` (a step's, in order) until one finishes ``seq``: (tokens kept,
        finished). Tokens after that are dropped, exactly as single steps would never have made
        them; the K/V they left in the sequence's blocks goes with the blocks."""
        if len(tokens) == 1:  # the common case, a single step's token
            token = tokens[0]
            seq.token_ids.append(token)
            if logprobs:
                seq.logprobs.append(logprobs[0])
            if len(seq.token_ids) < seq.stop_len and token not in seq.stop_ids:
                return 1, False  # the common row: below its limits, no stop strings, not a stop id
            return 1, self._check_stop(seq, token)
        params = seq.params
        if params.stop or logprobs or not tokens:  # stop strings (validate: never empty ones)
            # Token by token: text decides for stop strings, as single steps would.
            for j, token in enumerate(tokens):
                seq.append_token(token)
                if logprobs:
                    seq.logprobs.append(logprobs[j])
                if self._check_stop(seq, token):
                    return j + 1, True
            return len(tokens), False
        # Otherwise only a stop token or a length limit can end it: find the first in bulk, then
        # let _check_stop judge the last kept token (it finishes the sequence, or none did).
        n = len(seq.token_ids)
        kept = min(len(tokens), params.max_tokens - (n - seq.num_prompt_tokens), self.max_model_len - n)
        stops = seq.stop_ids if seq.stop_ids is not None else self._stop_ids(seq)
        if stops and not stops.isdisjoint(tokens):
            kept = min(kept, next(j for j, t in enumerate(tokens) if t in stops) + 1)
        seq.token_ids.extend(tokens if kept == len(tokens) else tokens[:kept])
        return kept, self._check_stop(seq, tokens[kept - 1])

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Finish ``seq`` alone because of ``error``. Inside a step the scheduler frees it with the
        other finished sequences; outside one, ``_fail_outside_step`` aborts it."""
        seq.error = f"{type(error).__name__}: {error}"
        seq.finish_reason = "error"
        seq.status = SequenceStatus.FINISHED

    def _fail_outside_step(self, seq: Sequence, error: Exception) -> None:
        running = not seq.is_finished
        self._fail(seq, error)
        if running:
            self.scheduler.abort(seq)

    def _stop_ids(self, seq: Sequence) -> frozenset[int]:
        eos = frozenset() if seq.params.ignore_eos else frozenset(self.eos_token_ids)
        return frozenset(seq.params.stop_token_ids) | eos

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Finish ``seq`` if ``token`` ends it; returns whether it did. Stop strings (the only
        check that decodes text) are looked at only for requests that have them."""
        params = seq.params
        reason: str | None = None
        if token in (seq.stop_ids if seq.stop_ids is not None else self._stop_ids(seq)):
            reason = "stop"
            if params.ignore_eos or token not in self.eos_token_ids:  # a stop token id, not EOS
                seq.stop_reason = token
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
            if n - seq.num_prompt_tokens >= params.max_tokens or n >= self.max_model_len:
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
        """The request's result. Never raises: a failure while building it becomes its error."""
        if seq.error is None:
            try:
                seq.output_text = self.detokenize(seq)
            except Exception as e:
                self._fail_outside_step(seq, e)
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
            error=seq.error,
        )

    def delta(self, seq: Sequence) -> RequestDelta:
        """Tokens and text since the last delta. Text that may still change (an incomplete UTF-8
        character, or a possible start of a stop string) is held back until it settles. Never
        raises: a failure ends the request (aborted if still running) with a finished error delta."""
        if seq.error is None:
            try:
                return self._delta(seq)
            except Exception as e:
                self._fail_outside_step(seq, e)
        return RequestDelta(seq.request_id, [], "", finished=True, finish_reason="error", error=seq.error)

    def _delta(self, seq: Sequence) -> RequestDelta:
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
