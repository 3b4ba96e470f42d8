"""Speculative decoding: a drafter proposes k tokens per sequence, the target verifies all of them in
one forward, rejection sampling keeps the output distribution the target's (greedy: identical).

    config.py     SpeculativeConfig.from_dict(speculative_config), check_same_vocabulary and
                  draft_engine_config (the draft runner's EngineConfig, checked against the target)
    proposer.py   Proposal, the Proposer protocol, draft_limit (k per sequence)
    ngram.py      NgramProposer: prompt lookup, no model
    medusa.py     MedusaProposer: heads on the target's last hidden state (common/medusa.py), the
                  target's LM head; load_medusa_heads checks the artifact against the target
    rejection.py  verify(): greedy matching and batched rejection sampling, no host sync
    draft_sampler.py  sample_draft(): one draft step's tokens and probabilities q, no host sync
    metrics.py    SpecDecodeMetrics: acceptance counters and draft/verify time
    policy.py     SpecPolicy: num_speculative_tokens_per_batch_size "auto", k per step from step costs
                  (calibrated by the engine's step times), the drafter's match rate and the
                  acceptance observed (0 where speculation does not pay)
    step_costs.py measure_step_costs(): those step costs, timed by the engine at startup

    min_tokens.py ban_stop_tokens(): min_tokens in draft and target logits
    draft_model.py DraftModelProposer: the draft ModelRunner's catch-up + k - 1 decode forwards
    draft_vocab.py draft_vocab_size: the draft's LM head kept to the most frequent tokens (FR-Spec)
    worker.py     SpecDecodeWorker.step(): draft, verify forward, verify(), the StepResult
    verify_paths.py VerifyPaths: which forward a verify takes, timed per token count at startup
    rounds.py     GreedyRounds: num_rounds R device-resident greedy rounds per step (a draft model's
                  or n-gram's drafts, the verify, kernels/spec_advance.py), one sync per R rounds

How it runs in the engine:

1. Construction. ``EngineConfig.speculative_config`` is parsed by SpeculativeConfig.from_dict in
   EngineConfig's checks. A draft model is checked (draft_engine_config: vocabulary, positions)
   before either model is built; its runner has its own KV tensors with the target's pool size and
   indexes them with the *sequence's* block table: one BlockManager, so allocation, prefix caching,
   preemption and rollback are one piece of bookkeeping. On a GPU the pool is sized by the target's
   plus the draft's KV bytes per token. Both runners run on one stream.
2. Scheduling. A decode step of n <= max_batch_size sequences with k = k_for_step(n) > 0 reserves
   blocks for n_i + 1 positions per sequence (n_i = draft_limit) and becomes a speculative step
   (``ScheduledBatch.num_draft``); without the blocks it decodes plainly. k_for_step is
   SpecDecodeWorker.k_for_step: the config's table, or under "auto" the SpecPolicy's choice from the
   step costs the worker measured once both runners held their graphs (step_costs.py), what the
   engine's steps took beyond them (LLMEngine.step reports each decode step's wall time,
   SpecDecodeWorker.record_step), the share of rounds the drafter proposed anything in and the
   per-position acceptance of its proposals (for n-gram, plain steps' unrun rounds too, at a
   measured share of the plain steps' time), and how lastingly the batch's sequences differ (a
   speculative step of a batch is costed by its slowest sequence: policy.RowSpread). With
   num_rounds R an all-greedy step at k = num_speculative_tokens runs R device-resident rounds
   (rounds.py; under "auto" costed per round from the startup table).
3. Draft (draft_model.py; Medusa: medusa.py, the heads on each sequence's kept feature, no catch-up,
   0 tokens for a sequence without a current one). ``seq.draft_computed`` says how far the draft's K/V goes. A sequence
   lagging by more than its last token first catches up (VerifyPaths.last_logits: as decode
   pseudo-rows, one decode graph replay, where the tokens fit, else the varlen prefill path; after a
   fully accepted round one token; a whole prompt after admission, a prefix-cache hit or a
   preemption: the draft computes its own prefill, lazily, so a block cached by the target is never
   read by the draft before it wrote it). Then k decode forwards from the last token through the
   draft runner's decode graphs: a plain greedy batch replays the multi-step greedy graphs (forward
   + greedy advance), any other samples on the device and feeds the token back
   (DecodeInputs.advance_to). One transfer at the end.
4. Verify. The target scores [last, d_0 .. d_{m-1}] at len - 1 .. len - 1 + m in one forward with
   logits at every row: while the batch's tokens fit the fused small-batch decode (16 rows), as
   decode pseudo-rows, one row per token sharing its sequence's block table (decode_inputs.py),
   in the decode graphs; larger batches through the varlen prefill path (a verify graph,
   PrefillGraphs(all_rows=True), where one holds it); each of the two also with multi-query decode
   attention (kernels/verify_attention.py: a sequence's K/V read once for its k + 1 tokens), and
   per token count the path timed fastest at startup (verify_paths.py). rejection.verify; one
   to_lists(), the round's one sync. Logprobs: log_softmax of the raw target logits. For Medusa the
   same forward also returns its hidden rows (every path; the graphs' second output) and each
   sequence keeps its bonus token's row with the length it belongs to (Sequence.spec_feature).
5. Accept and roll back. The engine's one append path cuts a run at stop tokens, stop strings,
   max_tokens; Scheduler.finish_step sets num_computed_tokens = len - 1, clamps draft_computed to it
   and releases blocks past the kept tokens (BlockManager.release_unused). Rejected entries in kept
   blocks are overwritten by position later; hashes only ever cover kept, computed tokens.
6. Metrics. SpecDecodeWorker.metrics (engine.spec_metrics, engine.stats()["spec_decode"]; under
   "auto" also its ``policy``: steps per chosen k, probes, the match and acceptance estimates, the
   cost table and the measured overheads).
7. Tensor parallelism (``tensor_parallel_size`` > 1, engine/parallel). The target is sharded and
   its workers hold the same verify graphs (built with rank 0's runner arguments). Each verify is a
   VerifyStep sent over the step channel: the path rank 0 chose and the chunks (tokens, positions,
   block tables); a model drafter's tokens reach the workers by a broadcast from rank 0's device.
   Every rank runs that forward on its shard; the logits are gathered on every rank. Drafting (the
   n-gram lookup, or a draft model whole on rank 0 with its K/V there only: draft_engine_config
   gives it one rank, group_for keeps its forwards off the process group), acceptance, sampling and
   rollback stay on rank 0: the workers' caches need only the block tables and positions that every
   step sends. Greedy output equals one rank's without speculation. Medusa is refused under tensor
   parallelism (its drafts need the LM head whole on rank 0).
"""

from engine.spec_decode.config import (
    SpeculativeConfig, SpeculativeConfigError, check_same_vocabulary, draft_engine_config,
)
from engine.spec_decode.draft_sampler import sample_draft
from engine.spec_decode.metrics import SpecDecodeMetrics
from engine.spec_decode.ngram import NgramProposer, ngram_proposal
from engine.spec_decode.proposer import Proposal, Proposer, draft_limit
from engine.spec_decode.rejection import VerifiedTokens, greedy_verify, processed_probs, rejection_sample, verify

__all__ = [
    "SpeculativeConfig", "SpeculativeConfigError", "check_same_vocabulary", "draft_engine_config",
    "SpecDecodeMetrics", "NgramProposer", "ngram_proposal", "Proposal", "Proposer", "draft_limit", "VerifiedTokens",
    "greedy_verify", "processed_probs", "rejection_sample", "verify", "sample_draft",
]
