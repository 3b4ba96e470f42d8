"""Speculative decoding: a drafter proposes k tokens per sequence, the target verifies all of them in
one forward, rejection sampling keeps the output distribution the target's (greedy: identical).

    config.py     SpeculativeConfig.from_dict(speculative_config), check_same_vocabulary and
                  draft_engine_config (the draft runner's EngineConfig, checked against the target)
    proposer.py   Proposal, the Proposer protocol, draft_limit (k per sequence)
    ngram.py      NgramProposer: prompt lookup, no model
    rejection.py  verify(): greedy matching and batched rejection sampling, no host sync
    draft_sampler.py  sample_draft(): one draft step's tokens and probabilities q, no host sync
    metrics.py    SpecDecodeMetrics: acceptance counters and draft/verify time

Integration plan (phase 2, on the runner/scheduler whose steps return a list of tokens per sequence):

1. Construction. ``EngineConfig.speculative_config`` (dict) -> SpeculativeConfig.from_dict before any
   work. Draft model: draft_engine_config(target config, target tokenizer, spec, num_kv_blocks)
   checks vocabulary and positions and gives the EngineConfig of a second ModelRunner (same
   block_size and pool size). The draft gets its own KV tensors but indexes them with the
   *sequence's* block table: one BlockManager, one table per sequence, so allocation, prefix
   caching, preemption and rollback stay one piece of bookkeeping (a second BlockManager would
   duplicate all of it). The pool is sized by the target's plus the draft's KV bytes per token.
   Every prefill chunk runs on both runners, so a prefix-cache hit is valid in both caches. Both
   runners on one stream, one after the other: the split-decode counters
   (kernels/paged_attention.split_counters) are one buffer per device.
2. Draft. Per sequence, ``draft_computed`` (draft K/V written up to there) may trail the target's by
   one token after a fully accepted round (the k-th draft token was sampled, never fed). The draft's
   first forward feeds the 1-2 missing tokens (varlen prefill path, query length 1 or 2), then k - 1
   decode forwards back to back on the device, each through draft_sampler.sample_draft (argmax for
   greedy rows) keeping q [B, k, V]: the multi-step decode graph with the greedy advance swapped
   for a sampling advance (all-greedy batches keep the greedy one). No host sync between draft steps.
3. Verify. The scheduler reserves k_i + 1 slots (``may_append(seq, k_i + 1)``, k_i = draft_limit).
   The target runs the varlen prefill path with query [last token, d_0 .. d_{k_i - 1}] at positions
   len-1 .. len-1+k_i (context len + k_i), returning logits at *all* query rows (a prefill-graph
   variant that keeps every row), padded to [B, k+1, V]; then rejection.verify and one to_lists().
   Logprobs, where asked for: log_softmax of the raw target logits at the emitted positions.
   min_tokens: stop ids masked in draft and target logits at positions whose output index < min_tokens.
4. Accept and roll back. The emitted tokens go through the engine's multi-step append (stop tokens,
   stop strings token by token, max_tokens, max_model_len cut the run; tokens after the cut are
   dropped). Then, in both caches at once (shared table): num_computed_tokens = len(token_ids) - 1
   (the last emitted token has no K/V yet), draft_computed = min(draft_computed, that), and the block
   table shrinks to ceil(len(token_ids) / block_size) blocks: blocks past it held only rejected K/V
   and go back to the free list (a BlockManager.truncate(seq, num_tokens); they were never hashed,
   as mark_computed only hashes computed full blocks and runs after the rollback). Rejected entries in
   kept blocks are overwritten by position later. A finished sequence is freed as today.
5. k per batch size. SpeculativeConfig.k_for_batch(len(batch)) from the measured table
   (experiments/spec_bench.py: speed-up per batch size and k); 0 runs a plain (multi-step) decode
   step. While speculation is off the draft cache lags; its next first forward catches up (a longer
   query in step 2). Greedy-only batches at k = 0 keep today's multi-step path.
6. Metrics. engine.spec_metrics = SpecDecodeMetrics(); record(proposal.num_tokens, accepted) per
   verify step, draft/verify time per phase; exposed with the engine's stats and, later, /metrics.
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
