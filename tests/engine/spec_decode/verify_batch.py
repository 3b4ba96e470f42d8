"""A ragged verify batch for the pseudo-row tests: three sequences of different context lengths
whose k + 1 verify tokens cross block boundaries, and a target runner with their contexts cached."""

from __future__ import annotations

import torch

from engine.llm import LLM

BLOCK = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# (context tokens, verify tokens, block table): A crosses from block 2 into 3 at position 12, B from
# block 1 into 2 at position 8, C starts at position 2 of a short context.
CONTEXTS = [([7, 3, 9, 1, 4, 4, 2, 8, 5], [11, 12, 13, 14, 15], [0, 1, 2, 7]),
            ([21, 22, 23, 24, 25, 26], [31, 32, 33], [3, 4, 8]),
            ([41, 42], [51, 52], [5, 6])]


def verify_runner(target: str, **kw):
    """A target runner sized for verifying batches of up to 16 sequences with k = 4 (as the engine
    builds it for speculative_config), its KV pool filled with the contexts of CONTEXTS."""
    llm = LLM(target, device="cpu", dtype="float32", max_model_len=64, block_size=BLOCK, num_kv_blocks=32,
              enable_prefix_caching=False, speculative_config={**NGRAM, "max_batch_size": 16}, **kw)
    runner = llm.engine.runner
    with torch.inference_mode():
        runner.verify_paths.prefill_all_logits([(ctx, 0, table) for ctx, _, table in CONTEXTS])
    return llm, runner


def verify_chunks() -> list[tuple[list[int], int, list[int]]]:
    return [(tail, len(ctx), table) for ctx, tail, table in CONTEXTS]
