"""Speculative decoding in the engine (CPU, fp32, tiny random models of one vocabulary): greedy
output equals plain decoding, stops and limits inside accepted runs, rollback under preemption,
prefix caching, seeded sampling, and the sampled distribution equals the target's."""

from __future__ import annotations

import pytest
import torch
from drafts import assert_mixed_batch_matches_plain, assert_stops_inside_accepted_runs, perturbed_copy
from tiny_models import SMALL_VOCAB, prompts, small_vocab_model
from token_stats import tv, tv_bound
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfigError

TARGET = "llama_gqa_untied"
MAX_TOKENS = (5, 17, 9, 30, 1, 12, 23, 2)


@pytest.fixture(scope="module")
def target(model_dir) -> str:
    return model_dir(TARGET, with_tokenizer=True)


@pytest.fixture(scope="module")
def drafts(target, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("drafts")
    return {"poor": perturbed_copy(target, str(root / "poor"), 0.008),
            "exact": perturbed_copy(target, str(root / "exact"), 0.0)}


def _ids(ps: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in ps]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(target: str, ps, params, spec=None, **kw):
    llm = LLM(target, device="cpu", speculative_config=spec, **kw)
    return [o.token_ids for o in llm.generate(_ids(ps), params)], llm.engine


def _model_spec(path: str, k: int = 3, **kw) -> dict:
    return {"model": path, "num_speculative_tokens": k, **kw}


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize("drafter", ["poor", "ngram"])
def test_greedy_output_equals_plain_decoding_in_a_ragged_batch(target, drafts, drafter):
    ps = prompts(len(MAX_TOKENS), seed=3, lo=2, hi=40)
    # n-gram lookups need repeats: half the prompts repeat a phrase.
    ps = [p + p[: len(p) // 2] if i % 2 else p for i, p in enumerate(ps)]
    params = [_greedy(m) for m in MAX_TOKENS]
    base, _ = _run(target, ps, params)
    spec = _model_spec(drafts["poor"]) if drafter == "poor" else NGRAM
    out, engine = _run(target, ps, params, spec)
    assert out == base
    m = engine.spec_metrics
    assert engine.num_spec_steps > 0 and m.num_proposed > 0
    if drafter == "poor":  # a drafter that often disagrees, and sometimes agrees
        assert 0.1 < m.acceptance_rate < 0.9
    else:
        assert m.num_accepted > 0
    assert m.num_accepted == sum(m.accepted_per_position) and m.num_emitted > m.num_accepted


def test_mixed_batch_greedy_sampling_and_logprobs(target, drafts):
    """Greedy rows with and without logprobs equal plain decoding (logprobs too) beside sampling rows."""
    ps = prompts(6, seed=4, lo=3, hi=30)
    params = [_greedy(10), _greedy(12, logprobs=2), SamplingParams(temperature=0.9, max_tokens=11, seed=5),
              _greedy(7, logprobs=0), SamplingParams(temperature=1.0, top_k=5, max_tokens=9, logprobs=1), _greedy(14)]
    plain = LLM(target, device="cpu").generate(_ids(ps), params)
    spec = LLM(target, device="cpu", speculative_config=_model_spec(drafts["poor"])).generate(_ids(ps), params)
    assert_mixed_batch_matches_plain(plain, spec, params)


def test_stop_token_stop_string_and_max_tokens_inside_an_accepted_run(target, drafts):
    """With a drafter equal to the target every draft is accepted, so the stops land inside runs."""
    ps = prompts(3, seed=5, lo=4, hi=20)
    base, _ = _run(target, ps, [_greedy(20)] * 3)
    llm = LLM(target, device="cpu", speculative_config=_model_spec(drafts["exact"], k=4))
    assert_stops_inside_accepted_runs(llm, base, _ids(ps), 20, cut=7)
    m = llm.engine.spec_metrics
    assert m.acceptance_rate == 1.0 and m.mean_accepted_length > 2


def test_min_tokens_bans_stops_in_draft_and_verify(target, drafts):
    ps = prompts(2, seed=6, lo=4, hi=20)
    base, _ = _run(target, ps, [_greedy(12)] * 2)
    eos_like = base[0][1]  # a token the greedy run emits early: banned until min_tokens
    params = [_greedy(12, stop_token_ids=[eos_like], min_tokens=6), _greedy(12, min_tokens=3)]
    plain, _ = _run(target, ps, params)
    out, _ = _run(target, ps, params, _model_spec(drafts["exact"], k=4))
    assert out == plain


def test_rollback_under_preemption(target, drafts):
    """A pool too small for every sequence forces recompute; both caches stay right."""
    ps = prompts(6, seed=7, lo=20, hi=40)
    params = [_greedy(m) for m in (30, 25, 28, 20, 31, 26)]
    base, _ = _run(target, ps, params, block_size=4, num_kv_blocks=40, max_model_len=128)
    out, engine = _run(target, ps, params, _model_spec(drafts["poor"]), block_size=4, num_kv_blocks=40,
                       max_model_len=128)
    assert engine.scheduler.num_preemptions > 0
    assert out == base
    assert engine.block_manager.num_free_blocks == 40  # every block came back


def test_prefix_caching_with_a_draft_model(target, drafts):
    """A second request hits the target's cached blocks; the draft computes its own K/V for them."""
    shared = prompts(1, seed=8, lo=40, hi=41)[0]
    ps = [shared + [5, 6, 7], shared + [9, 10]]
    params = [_greedy(15), _greedy(15)]
    base, _ = _run(target, ps, params, block_size=8, enable_prefix_caching=False)
    llm = LLM(target, device="cpu", speculative_config=_model_spec(drafts["exact"]), block_size=8)
    first = llm.generate(_ids(ps[:1]), params[:1])
    second = llm.generate(_ids(ps[1:]), params[1:])
    assert second[0].num_cached_tokens >= 32
    assert [first[0].token_ids, second[0].token_ids] == base
    assert llm.engine.spec_metrics.acceptance_rate == 1.0  # the draft's cache held the right K/V


def test_seeded_sampling_is_reproducible(target, drafts):
    ps = prompts(4, seed=9, lo=3, hi=25)
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=s, ignore_eos=True) for s in (1, 2, 3, 4)]
    spec = _model_spec(drafts["poor"])
    a, _ = _run(target, ps, params, spec)
    b, _ = _run(target, ps, params, spec)
    assert a == b
    other = [SamplingParams(temperature=1.0, max_tokens=12, seed=s + 10, ignore_eos=True) for s in (1, 2, 3, 4)]
    c, _ = _run(target, ps, other, spec)
    assert c != a


def test_ngram_and_batch_size_policy(target):
    """Above max_batch_size the step decodes plainly (no speculative step)."""
    ps = prompts(3, seed=10, lo=3, hi=20)
    spec = {**NGRAM, "max_batch_size": 2}
    out, engine = _run(target, ps, [_greedy(6)] * 3, spec)
    base, _ = _run(target, ps, [_greedy(6)] * 3)
    assert out == base and engine.num_spec_steps == 0


def test_vocabulary_mismatch_is_an_error_at_construction(target, model_root, tmp_path):
    other = tmp_path / "other"
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    with pytest.raises(SpeculativeConfigError, match="vocab_size"):
        LLM(target, device="cpu", speculative_config=_model_spec(str(other)))
    with pytest.raises(SpeculativeConfigError, match="num_speculative_tokens"):
        LLM(target, device="cpu", speculative_config={"method": "ngram"})


# -- the sampled distribution is the target's -------------------------------------------------------------
@pytest.mark.parametrize("temp,top_k,seeded", [(0.8, 0, False), (1.0, 5, False), (0.8, 0, True)])
def test_sampled_tokens_follow_the_target_distribution(tmp_path, temp, top_k, seeded):
    """Many samples of output tokens 1 and 2 (both from speculative steps, with a poor drafter) against
    the target's exact marginals after temperature and top-k, within the phase-1 TV bound."""
    target = small_vocab_model(tmp_path / "target", 0)
    draft = small_vocab_model(tmp_path / "draft", 1)
    prompt, n = [3, 7, 1], 3000
    llm = LLM(target, device="cpu", max_num_seqs=n, max_model_len=16,
              speculative_config=_model_spec(draft, k=2, max_batch_size=n))
    params = [SamplingParams(temperature=temp, top_k=top_k, max_tokens=3, seed=i if seeded else None)
              for i in range(n)]  # seeded: every request its own seed, all draws from counters
    out = llm.generate(_ids([prompt] * n), params)
    assert llm.engine.num_spec_steps > 0 and 0 < llm.engine.spec_metrics.acceptance_rate < 1
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def probs(prefixes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(prefixes).logits[:, -1] / temp
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    p0 = probs(torch.tensor([prompt]))[0]
    seq1 = torch.tensor([prompt + [t] for t in range(SMALL_VOCAB)])
    p1_given = probs(seq1)  # [t0, t1]
    p1 = p0 @ p1_given
    seq2 = torch.tensor([prompt + [a, b] for a in range(SMALL_VOCAB) for b in range(SMALL_VOCAB)])
    joint01 = (p0[:, None] * p1_given).reshape(-1)
    p2 = joint01 @ probs(seq2)
    tokens = torch.tensor([o.token_ids for o in out])
    bound = tv_bound(n, SMALL_VOCAB)
    for j, p in ((1, p1), (2, p2)):
        counts = torch.bincount(tokens[:, j], minlength=SMALL_VOCAB).float()
        assert tv(counts, p) < bound, (j, tv(counts, p), bound)


def test_async_llm_takes_speculative_config(target, drafts):
    """AsyncLLM passes speculative_config to its engine; the streamed tokens equal plain decoding."""
    import asyncio

    from engine.async_llm import AsyncLLM

    ps = prompts(3, seed=12, lo=3, hi=20)
    params = _greedy(9)
    base, _ = _run(target, ps, [params] * 3)
    engine = AsyncLLM(target, device="cpu", speculative_config=_model_spec(drafts["poor"]))

    async def collect(p):
        tokens = []
        async for delta in engine.generate({"prompt_token_ids": p}, params):
            tokens += delta.token_ids
        return tokens

    async def main():
        out = await asyncio.gather(*(collect(p) for p in ps))
        await engine.shutdown()
        return out

    assert asyncio.run(main()) == base
    assert engine.engine.num_spec_steps > 0


def test_draft_catches_up_after_steps_without_speculation(target, drafts):
    """Three sequences exceed max_batch_size 2, so the first decode steps are plain (multi-step);
    once one finishes, the draft's first forward computes every token it missed."""
    ps = prompts(3, seed=13, lo=4, hi=20)
    params = [_greedy(4), _greedy(20), _greedy(18)]
    base, _ = _run(target, ps, params)
    out, engine = _run(target, ps, params, _model_spec(drafts["exact"], max_batch_size=2))
    assert out == base
    assert engine.num_multi_steps > 0 and engine.num_spec_steps > 0
    assert engine.spec_metrics.acceptance_rate == 1.0  # the draft's cache holds every token's K/V
