"""Speculative decoding on the GPU: Triton kernels, the draft's decode graphs, the verify graphs."""

from __future__ import annotations

import pytest
from tiny_models import NEW_TOKENS

from engine import LLM, SamplingParams
from kernels.gemv import SMALL_M

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_fp32_graphs_greedy_with_speculation_matches_transformers(drafter, model_dir, mixed_prompts, hf_reference):
    # fp32 (IEEE dots in the Triton kernels); a tiny pool: preemption, chunking, graphs, rollback.
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = ({"model": model_dir("llama_mha_tied", with_tokenizer=True), "num_speculative_tokens": 4}
            if drafter == "model" else
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=96,
              max_num_batched_tokens=128, cuda_graph_max_bs=32, speculative_config={**spec, "max_batch_size": 32})
    engine = llm.engine
    assert engine.runner.verify_paths.verify_graphs is not None
    if drafter == "model":
        assert engine.draft_runner.graphs is not None and engine.draft_runner.prefill_graphs is not None
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference("llama_gqa_untied", mixed_prompts)
    assert engine.num_spec_steps > 0 and engine.scheduler.num_preemptions > 0


def test_bf16_mixed_batch_runs_and_seeded_sampling_repeats(model_dir, mixed_prompts):
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"model": model_dir("llama_mha_tied", with_tokenizer=True), "num_speculative_tokens": 3}
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=i, logprobs=1 if i % 3 == 0 else None)
              if i % 2 else SamplingParams(temperature=0.0, max_tokens=20) for i in range(8)]
    # fused_decode_rows pinned: each engine would time it apart (bf16 tokens need one path).
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256, kv_cache_tokens=8192, speculative_config=spec,
              fused_decode_rows=SMALL_M)
    a = LLM(target, **kw).generate(mixed_prompts[:8], params)
    b = LLM(target, **kw).generate(mixed_prompts[:8], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.error is None and len(o.token_ids) > 0 for o in a)


@pytest.mark.parametrize("path", ["pseudo_rows_mq", "prefill_mq"])
def test_fp32_graphs_greedy_through_each_multi_query_verify_path_matches_transformers(path, model_dir, mixed_prompts,
                                                                                         hf_reference):
    """Every verify forced through one multi-query path (its CUDA graphs: split counters, PDL, the
    newest k + 1 tokens' K/V from the kernel before); ragged batches (n-gram drafts of different
    lengths) through the runner-up, the prefill_mq graphs."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "max_batch_size": 32}
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=96,
              max_num_batched_tokens=128, cuda_graph_max_bs=32, speculative_config=spec)
    runner = llm.engine.runner
    assert runner.verify_paths.mq_graphs is not None and runner.verify_paths.mq_verify_graphs is not None
    assert set(runner.verify_paths.path) >= set(range(2, 17))  # timed at startup: a path for every token count
    runner.verify_paths.path = {n: path for n in range(17)} | {0: "prefill_mq"}
    runner.verify_paths.ragged = {n: "prefill_mq" for n in range(17)}
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference("llama_gqa_untied", mixed_prompts)
    assert llm.engine.num_spec_steps > 0


def test_auto_policy_measures_with_graphs_and_keeps_greedy_output(model_dir, mixed_prompts, hf_reference):
    """"auto" times its steps after graph capture, at every decode graph bucket up to max_batch_size,
    through the graphs (the draft's too); whatever k it then chooses, greedy output is transformers'."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"model": model_dir("llama_mha_tied", with_tokenizer=True), "num_speculative_tokens": 4,
            "num_speculative_tokens_per_batch_size": "auto", "max_batch_size": 32}
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=96,
              max_num_batched_tokens=128, cuda_graph_max_bs=32, speculative_config=spec)
    engine = llm.engine
    costs = engine.spec_worker.policy.costs
    assert costs.batch_sizes == engine.runner.graphs.buckets == [1, 2, 4, 8, 16, 32]
    assert all(t > 0 for t in costs.decode) and costs.measure_s < 30
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference("llama_gqa_untied", mixed_prompts)
    assert sum(engine.stats()["spec_decode"]["policy"]["steps_by_k"]) > 0
