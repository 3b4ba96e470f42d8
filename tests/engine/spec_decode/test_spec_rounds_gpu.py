"""Device-resident greedy speculative rounds on the GPU: one CUDA graph per batch bucket (drafter
steps + verify + spec_advance), replayed R times a step. Greedy output equals transformers' in fp32
(a drafter that disagrees often: another tiny model) and plain greedy decoding in bf16 graphs
(batch-invariant mode, a model of SmolLM2-135M's shape drafting for itself)."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import NEW_TOKENS

from engine import LLM, SamplingParams
from eval.bench.common import SHAPES, shape_dir

pytestmark = pytest.mark.gpu


def _check_rounds_ran(engine) -> None:
    rounds = engine.spec_worker.rounds
    assert rounds.graphs and set(rounds.graphs) == set(rounds.buckets)
    assert rounds.num_steps > 0
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks


@pytest.mark.parametrize("num_rounds", [2, 4])
def test_fp32_graphed_rounds_match_transformers(num_rounds, model_dir, mixed_prompts, hf_reference):
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"model": model_dir("llama_mha_tied", with_tokenizer=True), "num_speculative_tokens": 4,
            "num_rounds": num_rounds, "max_batch_size": 32}
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=160,
              max_num_batched_tokens=128, cuda_graph_max_bs=32, speculative_config=spec)
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS - i % 5, ignore_eos=True)
              for i in range(len(mixed_prompts))]
    outs = llm.generate(mixed_prompts, params)
    ref = hf_reference("llama_gqa_untied", mixed_prompts)
    assert [o.token_ids for o in outs] == [r[: p.max_tokens] for r, p in zip(ref, params)]
    _check_rounds_ran(llm.engine)


@pytest.mark.parametrize("num_rounds", [2, 4])
def test_fp32_graphed_ngram_rounds_match_transformers(num_rounds, model_dir, mixed_prompts, hf_reference):
    """n-gram rounds in CUDA graphs (the device lookup, the history's scatter, spec_advance's dummy
    drafter rows) on prompts whose halves repeat, so that drafts are found."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "num_rounds": num_rounds, "max_batch_size": 32}
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=200,
              max_num_batched_tokens=256, cuda_graph_max_bs=32, speculative_config=spec)
    ps = [p[: len(p) // 2 + 1] * 2 for p in mixed_prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS - i % 5, ignore_eos=True) for i in range(len(ps))]
    outs = llm.generate(ps, params)
    ref = hf_reference("llama_gqa_untied", ps)
    assert [o.token_ids for o in outs] == [r[: p.max_tokens] for r, p in zip(ref, params)]
    _check_rounds_ran(llm.engine)
    assert llm.engine.spec_metrics.num_accepted > 0


def test_fp32_graphed_ngram_auto_rounds_match_transformers(model_dir, mixed_prompts, hf_reference):
    """auto + num_rounds 4: the startup table times a graphed rounds step per round at every size the
    rounds take; the policy's steps (the warm-up's rounds, all prompts admitted at once, then plain or
    rounds as the measured costs say) keep transformers' greedy tokens."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "num_rounds": 4, "max_batch_size": 32, "num_speculative_tokens_per_batch_size": "auto"}
    llm = LLM(target, device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=400,
              max_num_batched_tokens=2048, cuda_graph_max_bs=32, speculative_config=spec)
    worker = llm.engine.spec_worker
    costs = worker.policy.costs
    assert len(costs.rounds) == sum(b <= worker.rounds.max_bs for b in costs.batch_sizes)
    assert all(t > 0 for t in costs.rounds) and worker.rounds.num_steps == 0
    ps = [p[: len(p) // 2 + 1] * 2 for p in mixed_prompts[:8]]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS - i % 5, ignore_eos=True) for i in range(len(ps))]
    outs = llm.generate(ps, params)
    ref = hf_reference("llama_gqa_untied", ps)
    assert [o.token_ids for o in outs] == [r[: p.max_tokens] for r, p in zip(ref, params)]
    _check_rounds_ran(llm.engine)  # the warm-up's steps at least


def _smollm2_prompts() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(3, SHAPES["smollm2-135m"]["vocab_size"], (n,), generator=g).tolist()}
            for n in (37, 120, 64, 9)]


def _generate(path: str, **kw) -> tuple[list[list[int]], object]:
    llm = LLM(path, device="cuda", dtype="bfloat16", load_format="dummy", batch_invariant=True, max_model_len=512,
              kv_cache_tokens=16384, **kw)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (200, 131, 256, 97)]
    outs = [o.token_ids for o in llm.generate(_smollm2_prompts(), params)]
    engine = llm.engine
    del llm
    gc.collect()
    return outs, engine


def test_bf16_graphed_rounds_equal_plain_greedy():
    path = shape_dir("smollm2-135m")
    plain, _ = _generate(path)
    spec, engine = _generate(path, speculative_config={"model": path, "num_speculative_tokens": 4, "num_rounds": 4})
    first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    assert first is None, f"sequence {first} differs"
    _check_rounds_ran(engine)
    assert engine.spec_metrics.acceptance_rate == 1.0  # the drafter is the target: every draft accepted
    torch.cuda.empty_cache()
