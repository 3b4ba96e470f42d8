"""One speculative decode step: draft, verify, and the tokens each sequence emits.

The scheduler reserved blocks for n_i + 1 positions per sequence (``ScheduledBatch.num_draft``).
The proposer drafts up to n_i tokens per sequence; the target scores [last token, d_0 .. d_{m-1}]
at positions len - 1 .. len - 1 + m in one forward with logits at every row (VerifyPaths.all_logits:
decode pseudo-rows or the varlen prefill path, in graphs, with or without multi-query decode
attention: whichever verify_paths.py timed fastest for the token count); rejection.verify accepts
a prefix per sequence and adds the target's own token (a batch of plain greedy rows compares the
drafts with the target's argmax on the host instead: the same tokens, without the device ops).
A drafter that reads the target's hidden states (Medusa, medusa.py) gets the verify's hidden rows
too and keeps each sequence's bonus-token row (MedusaProposer.keep_features); a round in which no
sequence had one yet verifies the last tokens alone, not a plain decode step, to make them. The
result is a StepResult like any step's: the engine appends the tokens through its one append
path (stop tokens, stop strings, max_tokens cut a run there) and the scheduler's finish_step rolls
both caches back by bookkeeping (num_computed_tokens and draft_computed follow the kept tokens,
unused tail blocks are released).
"""

from __future__ import annotations

import time

import torch

from engine.layers.sampler import LogprobRows, StepResult, device_tensor, seeded_rows
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.metrics import PhaseClock, SpecDecodeMetrics
from engine.spec_decode.min_tokens import ban_stop_tokens
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.proposer import Proposal, Proposer
from engine.spec_decode.policy import SpecPolicy
from engine.spec_decode.rejection import greedy_agreement, verify
from engine.spec_decode.rounds import greedy_rounds
from engine.spec_decode.step_costs import measure_step_costs


class SpecDecodeWorker:
    def __init__(self, target: ModelRunner, proposer: Proposer, eos_token_ids: set[int] | frozenset[int],
                 spec: SpeculativeConfig | None = None) -> None:
        """``spec``: the k per batch size (its table, or with ``auto`` a SpecPolicy on step costs
        measured here, now that both runners hold their graphs); None: the scheduler's own spec_k."""
        self.target = target
        self.proposer = proposer
        self.eos_token_ids = eos_token_ids
        self.metrics = SpecDecodeMetrics()
        self._clock = PhaseClock(target.device)  # the steps' phase clock (its CUDA events made once)
        self.spec = spec
        self.policy: SpecPolicy | None = None
        self._proposed_any = True  # whether the latest speculative step's drafter proposed anything
        # A drafter that reads the verify's hidden rows (Medusa) verifies the last tokens of a round
        # in which no sequence had a feature yet, rather than decoding plainly: that gives them one.
        self.needs_hidden = getattr(proposer, "needs_hidden", False)
        self._warm_up = False  # the latest speculative step was such a round (nothing to observe)
        self._unrun_row = 0  # the row of the next plain step whose n-gram round is observed
        self.rounds = greedy_rounds(target, proposer, spec)  # num_rounds > 1: rounds.py
        if spec is not None and spec.auto:  # with rounds, a k_max step of R rounds is costed as such
            costs = measure_step_costs(target, proposer, spec.num_speculative_tokens, spec.max_batch_size,
                                       rounds=self.rounds)
            self.policy = SpecPolicy(spec.num_speculative_tokens, spec.max_batch_size, costs,
                                     num_rounds=spec.num_rounds if self.rounds is not None else 1,
                                     lookups=isinstance(proposer, NgramProposer))

    def k_for_step(self, batch_size: int) -> int:
        """The scheduler's spec_k: draft tokens per sequence for a decode step of ``batch_size``."""
        if self.policy is not None:
            if self._warm_up:  # the latest round only made features (Medusa after plain steps, a probe
                self._warm_up = False  # among them): its k once more, now with proposals to observe
                return self.policy.k_again(batch_size)
            return self.policy.k_for_step(batch_size)
        return self.spec.k_for_step(batch_size) if self.spec is not None else 0

    def record_step(self, batch: ScheduledBatch, seconds: float, num_new: list[int]) -> None:
        """A decode step's wall time, scheduling to appended tokens (``num_new`` per sequence), for
        the auto policy (SpecPolicy.observe_step): a plain step of ``num_steps`` tokens, or the
        latest speculative one. After a plain step an n-gram drafter's round is observed too."""
        if self.policy is None or batch.is_prefill:
            return
        n = len(batch.seqs)
        if batch.num_draft is not None:
            if batch.num_rounds > 1:  # R device-resident rounds: their time per round
                self.policy.observe_step(n, max(batch.num_draft), seconds, batch.num_rounds)
            elif not self._warm_up:  # a verify of the last tokens only is neither kind of round
                self.policy.observe_step(n, max(batch.num_draft), seconds, proposed=self._proposed_any)
            return
        self.policy.observe_step(n, 0, seconds, batch.num_steps)
        # Past max_batch_size nothing probes, so nothing would drop finished rows' lookup arrays.
        if (isinstance(self.proposer, NgramProposer) and n <= self.policy.max_batch_size
                and self.policy.lookup_due(n, seconds)):
            began = time.perf_counter()
            if self._unrun_round(batch.seqs, num_new):
                self.policy.observe_lookup(time.perf_counter() - began)

    def _unrun_round(self, seqs: list[Sequence], num_new: list[int]) -> bool:
        """The n-gram round a plain step ran instead, observed from the step's tokens: a plain greedy
        row's tokens are the target's argmax, so a draft is accepted exactly where it equals them,
        as a verify would have said. Without it the estimates stay where the policy turned to plain
        decoding until a probe. One row per step, in turn, after the plain steps the policy says
        (SpecPolicy.lookup_due: a share of the plain steps' time, larger while speculation might
        pay): a lookup each, off the device but between two steps, with the GPU idle (~90 us for a
        ~300-token context on the H200's host against ~3.8 ms for a plain 8-token step of
        SmolLM2-135M: the fourteenth session's n-gram engine with drafting off ran 0.96x the plain
        engine, Medusa's 1.05x), so its time is measured and spent from that share. Whether the
        row's lookup ran (a row that made no token, or sampled ones, is skipped)."""
        i = self._unrun_row % len(seqs)
        self._unrun_row += 1
        seq, new = seqs[i], num_new[i]
        if new == 0 or not seq.plain_greedy:
            return False
        k = min(self.policy.k_max, new)
        draft = self.proposer.proposal_before(seq, new, k)
        self.policy.observe([k], [greedy_agreement(draft, seq.token_ids[len(seq.token_ids) - new:])], [len(draft)])
        return True

    def stats(self) -> dict:
        """The metrics (SpecDecodeMetrics.as_dict) and, under ``auto``, the policy's choices and costs."""
        out = self.metrics.as_dict()
        if self.policy is not None:
            out["policy"] = self.policy.as_dict()
        return out

    def _record(self, batch: ScheduledBatch, proposed: list[int], accepted: list[int]) -> None:
        self.metrics.record(proposed, accepted)
        if self.policy is not None:  # a sequence without a proposal is a match miss, not a rejection
            # ... unless its drafter had no feature yet (Medusa after a prefill or a plain step):
            # it was not asked, and its round is no evidence either way.
            asked = [n if p or not self.needs_hidden else 0 for n, p in zip(batch.num_draft, proposed)]
            self.policy.observe(asked, accepted, proposed)
            # Each asked sequence's tokens of this one round, for how much the batch's sequences
            # differ lastingly (RowSpread: a fixed batch waits for its slowest).
            rows = [i for i, n in enumerate(asked) if n]
            self.policy.observe_tokens([batch.seqs[i].seq_id for i in rows], [accepted[i] + 1 for i in rows])

    def step(self, batch: ScheduledBatch) -> StepResult:
        """Draft, verify, accept: the host waits for the device once, for the emitted tokens (and
        once more when a sequence asked for logprobs)."""
        if batch.num_rounds > 1:  # R device-resident greedy rounds (rounds.py; the scheduler's spec_rounds)
            result = self.rounds.step(batch, self.metrics)
            if self.policy is not None:  # each round as a one-round step: its real proposals only
                made: dict[int, list[int]] = {}  # per row, the tokens of each round it ran
                for rows, proposed, accepted, emitted in self.rounds.last_rounds:
                    if rows:
                        self.policy.observe([self.rounds.k] * len(rows), accepted, proposed)
                    for i, e in zip(rows, emitted):
                        made.setdefault(i, []).append(e)
                # The rows that ran every round, for how much the batch's sequences differ (RowSpread).
                full = [i for i, m in made.items() if len(m) == len(self.rounds.last_rounds)]
                self.policy.observe_rows([batch.seqs[i].seq_id for i in full], [made[i] for i in full])
            return result
        seqs = batch.seqs
        assert batch.num_draft is not None
        clock = self._clock.start()
        proposal = self.proposer.propose(seqs, batch.num_draft)
        clock.mark()
        counts = proposal.num_tokens
        k = max(counts, default=0)
        self._proposed_any = k > 0
        self._warm_up = k == 0 and self.needs_hidden
        if k == 0 and not self.needs_hidden:  # nothing proposed (an n-gram without a match): a plain decode step
            result = self.target.run(ScheduledBatch(seqs, False, [1] * len(seqs)))
            clock.mark()
            self.metrics.add_phases(clock)
            self._record(batch, [0] * len(seqs), [0] * len(seqs))
            return result
        with torch.inference_mode():
            chunks, ids = self._verify_inputs(seqs, proposal, k)
            out = self.target.verify_paths.all_logits(chunks, ids, self.needs_hidden)  # [sum of (m_i + 1), V]
            flat, hidden = out if self.needs_hidden else (out, None)
            if all(s.plain_greedy for s in seqs):
                tokens, logprobs = self._greedy_tokens(flat, proposal, k, clock), None
            else:
                tokens, logprobs = self._verified_tokens(seqs, flat, proposal, k, clock)
            if hidden is not None:  # the bonus token's row, before the next forward overwrites it
                self.proposer.keep_features(seqs, hidden, counts, tokens)
        self.metrics.add_phases(clock)
        self._record(batch, counts, [len(t) - 1 for t in tokens])
        return StepResult(tokens, logprobs)

    def _verified_tokens(self, seqs: list[Sequence], flat: torch.Tensor, proposal: Proposal, k: int,
                         clock: PhaseClock) -> tuple[list[list[int]], list[list[TokenLogprobs]] | None]:
        """Emitted tokens (rejection.verify; the sync) and the logprobs of those asked for."""
        counts = proposal.num_tokens
        if all(m == k for m in counts):
            raw = flat.view(len(seqs), k + 1, -1)
        else:  # row i's position j is its flat row start_i + min(j, m_i): padding repeats its last
            index, start = [], 0  # row, and verify ignores positions past m_i
            for m in counts:
                index.extend(start + min(j, m) for j in range(k + 1))
                start += m + 1
            raw = flat.index_select(0, device_tensor(index, flat.device)).view(len(seqs), k + 1, -1)
        draft_ids, num_draft = proposal.as_tensors(raw.device, k)
        probs = proposal.probs[:, :k] if proposal.probs is not None else None
        target_logits = ban_stop_tokens(raw, seqs, self.eos_token_ids)
        verified = verify(draft_ids, num_draft, target_logits, [s.params for s in seqs], probs,
                          seeded_rows(seqs, raw.device))
        clock.mark()
        tokens = verified.to_lists()  # the sync
        return tokens, self._logprobs(raw, seqs, tokens)

    @staticmethod
    def _greedy_tokens(flat: torch.Tensor, proposal: Proposal, k: int, clock: PhaseClock) -> list[list[int]]:
        """rejection.greedy_verify's tokens for a batch of plain greedy rows (no logprobs, no stop
        token banned by min_tokens), compared on the host: the argmax of every verify row (and a
        model drafter's tokens) come back in one transfer, and each row keeps the argmax up to and
        including its first disagreement with the draft. The same tokens as greedy_verify, without
        its dozen small device ops per step (each a kernel launch on a GPU)."""
        counts = proposal.num_tokens
        rows = flat.shape[0]  # sum of (m_i + 1)
        argmax = flat.argmax(dim=-1)
        if proposal.ids is not None:  # a model drafter's tokens come back with it, [B, k] after the rows
            argmax = torch.cat([argmax, proposal.ids[:, :k].reshape(-1)])
        clock.mark()
        host = argmax.tolist()
        if proposal.ids is not None:
            drafts = [host[rows + i * k : rows + i * k + m] for i, m in enumerate(counts)]
        else:
            drafts = proposal.token_ids
        tokens: list[list[int]] = []
        start = 0
        for draft, m in zip(drafts, counts):
            target = host[start : start + m + 1]
            tokens.append(target[: greedy_agreement(draft, target) + 1])
            start += m + 1
        return tokens

    @staticmethod
    def _verify_inputs(seqs: list[Sequence], proposal: Proposal,
                       k: int) -> tuple[list[tuple[list[int], int, list[int]]], torch.Tensor | None]:
        """The verify forward's chunks, [last token, d_0 .. d_{m-1}] at len - 1.. per sequence, and,
        for drafts left on the device, its flat token ids there (the chunks' lists then only give
        the lengths): the draft's tokens reach the target without passing through the host."""
        if proposal.token_ids is not None:
            return [([s.token_ids[-1]] + d, len(s) - 1, s.block_table) for s, d in zip(seqs, proposal.token_ids)], None
        counts = proposal.num_tokens
        chunks = [([s.token_ids[-1]] + [0] * m, len(s) - 1, s.block_table) for s, m in zip(seqs, counts)]
        device = proposal.ids.device
        grid = torch.cat([device_tensor([s.token_ids[-1] for s in seqs], device, torch.int64)[:, None],
                          proposal.ids[:, :k]], dim=1)  # [B, k + 1]
        if all(m == k for m in counts):
            return chunks, grid.reshape(-1)
        keep = [i * (k + 1) + j for i, m in enumerate(counts) for j in range(m + 1)]
        return chunks, grid.reshape(-1).index_select(0, device_tensor(keep, device))

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs, tokens: list[list[int]]) -> list[list[TokenLogprobs]] | None:
        """The model's logprobs (log_softmax of the raw target logits) of each emitted token, for the
        sequences that asked; None when none did."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not want:
            return None
        out: list[list[TokenLogprobs]] = [[] for _ in seqs]
        lp = torch.log_softmax(raw[want], dim=-1)
        rows = LogprobRows()
        for r, i in enumerate(want):
            chosen = device_tensor(tokens[i], lp.device, torch.long)
            rows.add(lp[r, : len(tokens[i])], chosen, seqs[i].params.logprobs or 0)
        for i, entries in zip(want, rows.entries([tokens[i] for i in want])):
            out[i] = entries
        return out
