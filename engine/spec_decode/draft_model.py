"""The draft model's Proposer: a second ModelRunner whose K/V lives in its own cache tensors but
is indexed by each sequence's block table (one BlockManager for both models).

A draft of k tokens is one catch-up forward and k - 1 decode forwards, back to back on the device:

- catch-up: the tokens from ``seq.draft_computed`` to the last one, through the varlen prefill path
  (a prefill graph where one holds the step). Usually 1 token, 2 after a fully accepted round
  (the k-th draft token was sampled, never fed); a whole prompt after admission, a prefix-cache hit
  or a preemption (the draft computes its own prefill, so a block cached by the target is never
  read by the draft before the draft wrote it), or after steps that decoded without speculation.
- decode: the sampled token becomes the next input on the device (DecodeInputs.advance_to), and the
  draft runner's decode forward runs (its CUDA graph where the batch fits a bucket).

Each step samples on the device with the request's parameters (draft_sampler.sample_draft) and
keeps q for the verify step; one transfer at the end brings the k tokens of every row back.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.model_runner import ModelRunner
from engine.sequence import Sequence
from engine.spec_decode.draft_sampler import sample_draft
from engine.spec_decode.min_tokens import ban_stop_tokens
from engine.spec_decode.proposer import Proposal, per_sequence_k


class DraftModelProposer:
    has_probs = True

    def __init__(self, runner: ModelRunner, eos_token_ids: set[int] | frozenset[int]) -> None:
        self.runner = runner
        self.eos_token_ids = eos_token_ids

    def propose(self, seqs: Seq[Sequence], k: int | Seq[int]) -> Proposal:
        ks = per_sequence_k(seqs, k)
        steps = max(ks, default=0)
        if steps == 0:
            return Proposal([[] for _ in seqs])
        runner, seqs = self.runner, list(seqs)
        params = [s.params for s in seqs]
        gens = [runner.sampler.generator(s) for s in seqs]
        with torch.inference_mode():
            if any(s.draft_computed == 0 for s in seqs):
                runner.decode_inputs.forget_rows()  # new block tables since this runner last saw them
            chunks = [(s.token_ids[s.draft_computed :], s.draft_computed, s.block_table) for s in seqs]
            logits = runner.last_logits(chunks)
            token, q = sample_draft(self._masked(logits, seqs, 0), params, gens)
            tokens, probs = [token], [q]
            if steps > 1:
                n = len(seqs)
                inputs = runner.decode_inputs
                inputs.prepare(seqs, runner.graphs.bucket_of[n] if runner.graphed(n) else n)
                # Decode step j writes position len - 1 + j; a row stops at its own k's last one.
                last_pos = torch.tensor([len(s) - 1 + max(n_i - 1, 0) for s, n_i in zip(seqs, ks)],
                                        dtype=torch.int64).to(runner.device, non_blocking=True)
                for j in range(1, steps):
                    inputs.advance_to(token, n, last_pos)
                    token, q = sample_draft(self._masked(runner.decode_forward(n), seqs, j), params, gens)
                    tokens.append(token)
                    probs.append(q)
            host = torch.stack(tokens, dim=1).tolist()  # the one transfer
        for s, n_i in zip(seqs, ks):
            s.draft_computed = len(s) + max(n_i - 1, 0)
        return Proposal([row[:n_i] for row, n_i in zip(host, ks)],
                        torch.stack(probs, dim=1) if probs[0] is not None else None)

    def _masked(self, logits: torch.Tensor, seqs: list[Sequence], first: int) -> torch.Tensor:
        return ban_stop_tokens(logits[:, None], seqs, self.eos_token_ids, first)[:, 0]
