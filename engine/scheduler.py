"""Continuous batching: which sequences run in the next step, and how many tokens each.

A step is either a prefill step (prompt chunks, at most ``max_num_batched_tokens`` tokens in all)
or a decode step (one token for every running sequence that finished its prefill). Prefill goes
first so that new requests join the batch as soon as blocks allow; a prompt longer than the budget
is cut into chunks over several steps. When a decode step lacks blocks, the most recently admitted
sequence is preempted: its blocks are freed and it returns to the head of the queue, to be
recomputed later (its tokens so far become its prompt, so no output is lost or changed).

Multi-step decoding: when every decode sequence is plain greedy and no request waits, a decode
step may cover up to ``num_decode_steps`` tokens per sequence, run back to back on the device;
each sequence then gets blocks for all of them up front (or the step stays single). Like any step
it returns a list of tokens per sequence; ``finish_step`` counts what each sequence kept.

Speculative decoding: with ``spec_k`` (a function of the decode batch size, 0 = off), a decode
step drafts up to k tokens per sequence (``ScheduledBatch.num_draft``, engine/spec_decode/
proposer.draft_limit) and reserves blocks for the k + 1 positions the verify forward writes; if the
pool cannot hold them all, the step decodes plainly. Rejected tokens give their blocks back in
``finish_step``. With ``spec_rounds`` (R by batch size and k, 1 = off), a decode step whose sequences are
all plain greedy, with nobody waiting, runs R rounds of k drafts + verify on the device
(``ScheduledBatch.num_rounds``, engine/spec_decode/rounds.py): blocks for R (k + 1) positions each.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode.proposer import draft_limit


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    # Tokens each sequence computes this step: positions [num_computed_tokens, +num_scheduled).
    num_scheduled: list[int]
    # Decode only: forwards run back to back on the device, each feeding its greedy token to the
    # next (multi-step decoding); every sequence then has blocks for all of them.
    num_steps: int = 1
    # Speculative decode step: draft tokens each sequence may propose (blocks reserved for n + 1
    # positions from its last token); None for any other step.
    num_draft: list[int] | None = None
    # Speculative rounds run back to back on the device (num_draft drafts each); blocks reserved for
    # num_rounds * (num_draft + 1) positions per sequence.
    num_rounds: int = 1

    def samples(self, i: int) -> bool:
        """Whether sequence i's chunk reaches its last token, so a new token is sampled."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_scheduled[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        num_decode_steps: int = 1,
        max_model_len: int | None = None,
        spec_k: Callable[[int], int] | None = None,
        spec_rounds: Callable[[int, int], int] | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.spec_k = spec_k
        self.spec_rounds = spec_rounds
        self.num_decode_steps = num_decode_steps
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        # Chunks of prompts already admitted come first: they hold blocks and stall nothing else.
        for seq in [s for s in self.running if s.in_prefill]:  # most steps: none
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            remaining_if_admitted = seq.num_tokens  # upper bound before cache hits are known
            if not self.enable_chunked_prefill and remaining_if_admitted > budget and seqs:
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            seq.in_prefill = True
            self.running.append(seq)
            n = seq.num_tokens - seq.num_computed_tokens
            if self.enable_chunked_prefill:
                n = min(n, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= min(n, budget)
        if not seqs:
            return None
        return ScheduledBatch(seqs, True, counts)

    def _schedule_decode(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        queue = [s for s in self.running if not s.in_prefill]
        bm = self.block_manager
        block_size = bm.block_size
        # Most steps no sequence needs a block for its new token: all of them run, in order.
        if not [s for s in queue if len(s.block_table) * block_size < len(s.token_ids)]:
            seqs, queue = queue, []
        i = 0  # queue[i:] still waits; victims are taken from its end
        while i < len(queue):
            seq = queue[i]
            i += 1
            if len(seq.block_table) * block_size >= len(seq.token_ids):
                seqs.append(seq)  # the common case: its last block has room for the new token
                continue
            while not bm.can_append(seq):
                victim = queue.pop() if len(queue) > i else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.may_append(seq)
                seqs.append(seq)
        if not seqs:
            return None
        if self.spec_k is not None:
            k = self.spec_k(len(seqs))  # once a step: an auto policy counts its choices
            rounds = self._reserve_rounds(seqs, k) if self.spec_rounds is not None and not self.waiting else None
            if rounds is not None:
                return rounds
            num_draft = self._reserve_drafts(seqs, k)
            if num_draft is not None:
                return ScheduledBatch(seqs, False, [1] * len(seqs), 1, num_draft)
        # A preemption above queued a sequence, so this also keeps multi-step off then.
        steps = self._decode_steps(seqs) if self.num_decode_steps > 1 and not self.waiting else 1
        return ScheduledBatch(seqs, False, [1] * len(seqs), steps)

    def _decode_steps(self, seqs: list[Sequence]) -> int:
        """How many decode steps ``seqs`` run back to back (and reserves their blocks), or 1.

        Only when every sequence is plain greedy (temperature 0, no logprobs, past min_tokens): the
        device then picks each next token itself. The caller checked that nobody waits, so a new
        request waits at most one multi-step for its prefill. No sequence may pass max_model_len,
        and there is no point running past the longest remaining max_tokens. If the pool cannot
        hold every sequence's tokens of all the steps, one step it is (its blocks are reserved)."""
        steps = self.num_decode_steps
        max_len = self.max_model_len
        longest = 0  # tokens still wanted by the sequence that wants the most
        for seq in seqs:
            if not seq.plain_greedy:
                return 1
            n = len(seq.token_ids)
            if max_len is not None and max_len - n < steps:
                steps = max_len - n
            wanted = seq.params.max_tokens - (n - seq.num_prompt_tokens)
            if wanted > longest:
                longest = wanted
        steps = min(steps, longest)
        if steps <= 1 or not self.block_manager.reserve(seqs, [steps] * len(seqs)):
            return 1
        return steps

    def _reserve_drafts(self, seqs: list[Sequence], k: int) -> list[int] | None:
        """Per sequence, the draft tokens it may propose this step at ``k`` (blocks reserved for them), or
        None: speculation is off at this batch size, no sequence has room, or the pool lacks blocks."""
        if k <= 0:
            return None
        max_len = self.max_model_len if self.max_model_len is not None else 1 << 62
        num_draft = [draft_limit(seq, k, max_len) for seq in seqs]
        if not any(num_draft):
            return None
        if not self.block_manager.reserve(seqs, [n + 1 for n in num_draft]):
            return None
        return num_draft

    def _reserve_rounds(self, seqs: list[Sequence], k: int) -> ScheduledBatch | None:
        """A step of R device-resident speculative rounds (blocks reserved for R (k + 1) positions per
        sequence), or None: not every sequence is plain greedy, R is 1 for this batch size and k, or the pool
        lacks the blocks. Each round emits at least one token per sequence, so R stays within the
        longest remaining max_tokens; every position written stays below max_model_len. A sequence
        that finishes inside the step drops its later tokens (the engine's append)."""
        n = len(seqs)
        if k <= 0 or not all(s.plain_greedy for s in seqs):
            return None
        rounds = self.spec_rounds(n, k)
        max_len = self.max_model_len if self.max_model_len is not None else 1 << 62
        longest = max(s.params.max_tokens - s.num_output_tokens for s in seqs)
        room = min(max_len - s.num_tokens for s in seqs)
        rounds = min(rounds, longest, room // (k + 1))
        if rounds <= 1 or not self.block_manager.reserve(seqs, [rounds * (k + 1)] * n):
            return None
        return ScheduledBatch(seqs, False, [1] * n, 1, [k] * n, rounds)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.in_prefill = True
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish_step(self, batch: ScheduledBatch, num_new: list[int]) -> None:
        """Advance progress once the step's new tokens are appended (``num_new[i]`` to sequence
        i). A prefill chunk computed its tokens. A decode sequence computed the input of each
        token it kept: its last token's, then (multi-step) each kept token's but the last. Called
        after the append, so a block hashed here holds only tokens the sequence keeps. A sequence
        that kept fewer tokens than the step reserved slots for gives the unused blocks back if it
        goes on (a step that proposes several tokens and rejects a tail); a finished one frees
        all its blocks when it leaves (remove_finished)."""
        caching = self.block_manager.enable_prefix_caching
        if not batch.is_prefill:
            spec = batch.num_draft is not None
            steps = batch.num_steps
            for seq, n in zip(batch.seqs, num_new):
                seq.num_computed_tokens += n
                if spec:  # the draft's K/V past the kept tokens was rejected
                    seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)
                if (n < steps or spec) and not seq.is_finished:
                    self.block_manager.release_unused(seq)
            if caching:
                self.block_manager.mark_computed_many(batch.seqs)
            return
        for seq, n, new in zip(batch.seqs, batch.num_scheduled, num_new):
            seq.num_computed_tokens += n
            if new:  # the chunk reached the prompt's end and sampled its first token
                seq.in_prefill = False
            if caching:
                self.block_manager.mark_computed(seq)

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.is_finished]
        if done:
            self.running = [s for s in self.running if not s.is_finished]
            for seq in done:
                self.block_manager.deallocate(seq)
        return done
