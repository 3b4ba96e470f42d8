"""Greedy output of the engine is token-identical to transformers generate (fp32, CPU)."""

from __future__ import annotations

import pytest
from tiny_models import ARCHS, NEW_TOKENS, prompts

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run(path: str, token_prompts, **cfg):
    llm = LLM(path, device="cpu", max_model_len=256, **cfg)
    outs = llm.generate(token_prompts, GREEDY)
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    return llm, [o.token_ids for o in outs]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_continuous_batching_with_chunked_prefill(arch, model_dir, mixed_prompts, hf_reference):
    # 32 prompts of 1..69 tokens at once; a budget of 96 tokens a step forces chunked prefills
    # and staggered admission, so prefill and decode of different sequences interleave.
    llm, got = run(model_dir(arch), mixed_prompts, block_size=4, max_num_batched_tokens=96, max_num_seqs=32)
    assert got == hf_reference(arch, mixed_prompts)
    assert llm.engine.num_steps > NEW_TOKENS + 1  # really batched over many steps


@pytest.mark.parametrize("arch", ["llama_gqa_untied", "qwen3_qknorm", "llama3_rope_mqa"])
def test_preemption_by_recompute_keeps_tokens(arch, model_dir, mixed_prompts, hf_reference):
    # 64 blocks of 4 tokens = 256 tokens for 32 sequences of up to ~80 tokens: decode must preempt.
    llm, got = run(model_dir(arch), mixed_prompts, block_size=4, num_kv_blocks=64, max_num_batched_tokens=128)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == hf_reference(arch, mixed_prompts)
    assert llm.engine.block_manager.num_free_blocks == 64  # everything returned


@pytest.mark.parametrize("arch", ["llama_mha_tied", "qwen2_bias"])
def test_prefix_caching_on_shared_prefixes(arch, model_dir, hf_reference):
    shared = prompts(3, seed=7, lo=20, hi=40)
    tails = prompts(36, seed=8, lo=1, hi=12)
    token_prompts = [shared[i % 3] + tails[i] for i in range(36)]
    token_prompts += [shared[0]]  # a prompt that is entirely a cached prefix
    llm = LLM(model_dir(arch), device="cpu", max_model_len=256, block_size=4, max_num_batched_tokens=64)
    # Run twice: the second time every shared prefix is already cached.
    first = llm.generate(token_prompts, GREEDY)
    second = llm.generate(token_prompts, GREEDY)
    ref = hf_reference(arch, token_prompts)
    assert [o.token_ids for o in first] == ref
    assert [o.token_ids for o in second] == ref
    assert sum(o.num_cached_tokens for o in first) > 0  # later admissions hit earlier prefixes
    assert all(o.num_cached_tokens >= 16 for o in second[:36])
    assert second[-1].num_cached_tokens >= len(shared[0]) - 4  # all but the last (partial) block


def test_one_token_per_step_budget(model_dir, hf_reference):
    # Extreme chunking: a budget of 8 tokens per step and one sequence at a time.
    ps = prompts(4, seed=3, lo=20, hi=60)
    _, got = run(model_dir("mistral"), ps, block_size=8, max_num_batched_tokens=8, max_num_seqs=1)
    assert got == hf_reference("mistral", ps)


def test_chunked_prefill_off(model_dir, mixed_prompts, hf_reference):
    _, got = run(model_dir("llama_gqa_untied"), mixed_prompts, enable_chunked_prefill=False,
                 max_num_batched_tokens=256, enable_prefix_caching=False)
    assert got == hf_reference("llama_gqa_untied", mixed_prompts)


def test_staggered_finishes(model_dir, mixed_prompts, hf_reference):
    # Every request stops at its own length, so decode batches shrink and rows shift between steps.
    path = model_dir("llama3_rope_mqa")
    params = [SamplingParams(temperature=0.0, max_tokens=1 + i % NEW_TOKENS, ignore_eos=True) for i in range(len(mixed_prompts))]
    outs = LLM(path, device="cpu", max_model_len=256, block_size=4).generate(mixed_prompts, params)
    ref = hf_reference("llama3_rope_mqa", mixed_prompts)
    assert [o.token_ids for o in outs] == [r[: p.max_tokens] for r, p in zip(ref, params)]
