"""The draft model's Proposer: a second ModelRunner whose K/V lives in its own cache tensors but
is indexed by each sequence's block table (one BlockManager for both models).

``seq.draft_computed`` says how far the draft's K/V goes; a draft of k tokens is:

- catch-up, only for a sequence whose draft K/V lags by more than its last token: the tokens from
  draft_computed up to the last one (VerifyPaths.last_logits: decode pseudo-rows in a decode graph
  where the tokens fit, else the varlen prefill path, a prefill graph where one holds the step).
  One token after a fully accepted round (the k-th draft token was sampled, never fed); a whole
  prompt after admission, a prefix-cache hit or a preemption (the draft computes its
  own prefill, so a block cached by the target is never read by the draft before the draft wrote
  it), or the tokens of steps that decoded without speculation.
- k decode forwards from the last token, back to back on the device through the draft runner's
  decode path (its CUDA graphs where the batch fits a bucket). A plain greedy batch (every row
  greedy, past min_tokens, the same k) runs the runner's multi-step greedy decode: forward and
  greedy advance in one graph replay per token. Otherwise each step samples on the device with
  the request's parameters (draft_sampler.sample_draft, q kept for the verify step) and feeds the
  token back (DecodeInputs.advance_to).

With a draft vocabulary (``draft_vocab_size``, draft_vocab.py) the runner's LM head computes only
the subset's logits and returns -inf for the rest: the greedy graphs' argmax and sample_draft give
vocabulary ids, and q is zero outside the subset, with nothing here changed.

The k tokens of every row stay on the device (Proposal.ids): the verify forward reads them there,
and the round's one sync is the verify's (worker.py). Nothing here waits for the device.

Under tensor parallelism the draft runs whole on rank 0 (its runner has one rank: group_for keeps
its forwards off the process group); only the verify forward runs on every rank.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.layers.sampler import device_tensor, seeded_rows
from engine.model_runner import ModelRunner
from engine.parallel.group import group_for
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
            return Proposal([[] for _ in seqs])  # host lists: nothing to hand over
        runner, seqs = self.runner, list(seqs)
        with torch.inference_mode(), group_for(runner.config.tensor_parallel_size):
            self.catch_up(seqs)  # K/V only: the logits of the last token come from the first decode forward
            if steps > 1 and all(n_i == steps for n_i in ks) and all(
                    s.params.greedy and s.num_output_tokens >= s.params.min_tokens for s in seqs):
                ids = runner.decode_steps_on_device(seqs, steps).t().clone()  # [B, steps]
                proposal = Proposal(None, ids=ids, counts=ks)
            else:
                proposal = self._sampled(seqs, ks, steps)
        for s, n_i in zip(seqs, ks):
            s.draft_computed = len(s) + max(n_i - 1, 0)
        return proposal

    def catch_up(self, seqs: list[Sequence], lag: int = 1) -> None:
        """The draft's K/V of every token up to the last ``lag`` (those its next forward feeds), for
        the sequences behind that (a forward of their missing tokens, its logits unused). Inside
        inference mode and the draft's group_for."""
        runner = self.runner
        if any(s.draft_computed == 0 for s in seqs):
            runner.decode_inputs.forget_rows()  # new block tables since this runner last saw them
        lagging = [s for s in seqs if s.draft_computed < len(s) - lag]
        if lagging:
            runner.verify_paths.last_logits([(s.token_ids[s.draft_computed : len(s) - lag], s.draft_computed,
                                              s.block_table) for s in lagging])

    def _sampled(self, seqs: list[Sequence], ks: list[int], steps: int) -> Proposal:
        """``steps`` decode forwards, each sampled with the rows' own parameters; q kept."""
        runner = self.runner
        params = [s.params for s in seqs]
        seeded = seeded_rows(seqs, runner.device)
        n = len(seqs)
        inputs = runner.decode_inputs
        inputs.prepare(seqs, runner.graphs.bucket_of[n] if runner.graphed(n) else n)
        # Forward j writes position len - 1 + j; a row stops at its own k's last one.
        last_pos = device_tensor([len(s) - 1 + max(n_i - 1, 0) for s, n_i in zip(seqs, ks)], runner.device, torch.int64)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor | None] = []
        for j in range(steps):
            if j:
                inputs.advance_to(tokens[-1], n, last_pos)
            token, q = sample_draft(self._masked(runner.decode_forward(n), seqs, j), params, seeded, j)
            tokens.append(token)
            probs.append(q)
        return Proposal(None, torch.stack(probs, dim=1) if probs[0] is not None else None,
                        ids=torch.stack(tokens, dim=1), counts=ks)

    def _masked(self, logits: torch.Tensor, seqs: list[Sequence], first: int) -> torch.Tensor:
        return ban_stop_tokens(logits[:, None], seqs, self.eos_token_ids, first)[:, 0]
