"""A request's state inside the engine: its tokens, block table and progress."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum, auto

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely


# One entry per generated (or prompt) token: {token_id: Logprob} holding the chosen token and the top-n.
TokenLogprobs = dict[int, Logprob]


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose K/V is in the cache; the rest (at least the last token) still need a forward.
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        # Speculative decoding with a draft model: tokens whose K/V the draft's cache holds (same
        # block table). It trails num_computed_tokens (the draft catches up in its next forward) and
        # restarts at 0 with new blocks (admission, prefix-cache hits, preemption).
        self.draft_computed = 0
        # Speculative decoding with Medusa heads (spec_decode/medusa.py): the target's final hidden
        # state at the row whose logits gave the last token, as (features [B, hidden], its row, the
        # sequence length it belongs to); stale (no proposal) once the length differs: after a
        # prefill, a plain decode step or a preemption's recompute.
        self.spec_feature: tuple[torch.Tensor, int, int] | None = None
        # True from admission until the first forward that covers every token (prompt or recompute).
        self.in_prefill = True
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why it failed, when finish_reason is "error"
        self.output_text = ""
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs | None] = []
        self.stop_ids: frozenset[int] | None = None  # tokens that end it (EOS unless ignored); set by the engine
        # Set by the engine: below this many tokens only a stop id can end it (its max_tokens and
        # max_model_len come later), so a step's token that is none needs no stop check; 0: every
        # token is checked (stop strings, or a sequence the engine did not add).
        self.stop_len = 0
        self.num_returned_tokens = 0  # for streaming deltas
        self.num_returned_chars = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def plain_greedy(self) -> bool:
        """Greedy, without logprobs and past min_tokens: the argmax alone is its next token (so the
        device may pick it itself, as a multi-step decode does)."""
        p = self.params
        return p.temperature == 0.0 and p.logprobs is None and len(self.token_ids) - self.num_prompt_tokens >= p.min_tokens


    def num_blocks(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
