"""Prompt-logprob requests on the prefix cache: a request that shares a prefix with an earlier
prompt-logprob request takes the prefix's entries (and the hidden state after it) from the cache.

Exactness: the entries taken from the cache are bit for bit those the earlier request returned.
Against an engine without prefix caching the tokens, text, top-n token ids, their order and ranks
are equal, and the logprobs equal to fp32 rounding: the engine's fp32 arithmetic differs in the last
bits with the shapes of a step (a cold engine scores a prefix differently inside a 27- and a 33-token
prompt; the LM head's rows differ with the number of rows), so a cached entry cannot equal every
cold run bit for bit, nor the first computed position's (the LM head on the stored hidden state
with the chunk's rows) the earlier request's. Without batch-invariant kernels, vLLM's recomputation
is not bitwise reproducible either."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts

from engine import LLM, SamplingParams

ARCH = "llama_gqa_untied"
BLOCK = 4


def _prefix_family(seed: int, prefix_len: int = 26, tails: int = 3) -> list[list[int]]:
    """Prompts that share a ``prefix_len``-token prefix (more than six full blocks of 4)."""
    prefix = prompts(1, seed=seed, lo=prefix_len, hi=prefix_len + 1)[0]
    return [prefix + t for t in prompts(tails, seed=seed + 1, lo=3, hi=9)]


def _params(n: int | None, max_tokens: int = 3) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=n)


def _engine(model_dir, caching: bool = True, **kw) -> LLM:
    kw.setdefault("max_model_len", 128)
    return LLM(model_dir(ARCH, with_tokenizer=True), device="cpu", block_size=BLOCK,
               enable_prefix_caching=caching, **kw)


def _assert_same(got, want) -> None:
    """Equal to a run without the cache: every entry's tokens in order and ranks, the logprobs to
    fp32 rounding, and the response."""
    assert got.token_ids == want.token_ids and got.text == want.text
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs)
    assert got.prompt_logprobs[0] is want.prompt_logprobs[0] is None
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert list(g) == list(w) and [e.rank for e in g.values()] == [e.rank for e in w.values()]
        values = torch.tensor([[e.logprob for e in g.values()], [e.logprob for e in w.values()]])
        assert torch.allclose(values[0], values[1], rtol=0, atol=2e-5)


def _assert_from_cache(got, stored, hit_tokens: int) -> None:
    """Bit for bit the earlier request's entries for the cached positions; the first computed
    position's, from the stored hidden state, equal to fp32 rounding."""
    assert got.num_cached_tokens == hit_tokens
    assert got.prompt_logprobs[:hit_tokens] == stored.prompt_logprobs[:hit_tokens]
    g, w = got.prompt_logprobs[hit_tokens], stored.prompt_logprobs[hit_tokens]
    assert list(g) == list(w) and [e.rank for e in g.values()] == [e.rank for e in w.values()]
    assert all(abs(g[t].logprob - w[t].logprob) < 2e-5 for t in g)


@pytest.fixture(scope="module")
def cold(model_dir):
    return _engine(model_dir, caching=False)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_a_shared_prefix_is_served_from_the_cache(model_dir, cold, n):
    first, second, third = _prefix_family(seed=40 + n)
    warm = _engine(model_dir)
    stored = warm.generate([first], _params(n))[0]
    assert stored.num_cached_tokens == 0
    out = warm.generate([second], _params(n))[0]
    _assert_from_cache(out, stored, 24)  # six full blocks of the 26-token prefix
    _assert_same(out, cold.generate([second], _params(n))[0])
    # The shared prefix and one more token: the hit ends one block early (the last token is computed).
    whole = warm.generate([third[:27]], _params(n))[0]
    _assert_from_cache(whole, stored, 24)
    _assert_same(whole, cold.generate([third[:27]], _params(n))[0])


def test_more_top_n_than_stored_misses_and_fewer_is_trimmed(model_dir, cold):
    first, second, third = _prefix_family(seed=50)
    warm = _engine(model_dir)
    warm.generate([first], _params(2))
    more = warm.generate([second], _params(5))[0]
    assert more.num_cached_tokens == 0  # blocks stored with top-2 cannot give a top-5
    _assert_same(more, cold.generate([second], _params(5))[0])
    # `second` stored its blocks with top-5 (now the cached ones): a top-1 request trims them.
    fewer = warm.generate([third], _params(1))[0]
    assert fewer.num_cached_tokens == 24
    _assert_same(fewer, cold.generate([third], _params(1))[0])
    # Trimmed entries are those a top-1 request computes itself.
    again = warm.generate([first], _params(1))[0]
    _assert_from_cache(again, _engine(model_dir).generate([first], _params(1))[0], 32)  # its blocks, with top-2


def test_blocks_cached_without_logprobs_are_no_hits_until_a_logprob_request_computes_them(model_dir, cold):
    first, second, third = _prefix_family(seed=60)
    warm = _engine(model_dir)
    plain = warm.generate([first], _params(None))[0]
    stored = warm.generate([second], _params(1))[0]
    assert stored.num_cached_tokens == 0
    _assert_same(stored, cold.generate([second], _params(1))[0])
    after_logprobs = warm.generate([third], _params(1))[0]
    _assert_from_cache(after_logprobs, stored, 24)
    _assert_same(after_logprobs, cold.generate([third], _params(1))[0])
    # A request without prompt logprobs still hits the blocks either kind computed.
    again = warm.generate([first], _params(None))[0]
    assert again.num_cached_tokens >= 24 and again.token_ids == plain.token_ids


def test_evicted_blocks_drop_their_logprobs(model_dir, cold):
    first, second, _ = _prefix_family(seed=70)
    # 34 blocks of 4 tokens: a 125-token request (32 blocks) evicts most of what `first` cached.
    warm = _engine(model_dir, num_kv_blocks=34)
    warm.generate([first], _params(1))
    warm.generate(prompts(1, seed=71, lo=120, hi=121), _params(None, max_tokens=6))
    out = warm.generate([second], _params(1))[0]
    assert out.num_cached_tokens < 24
    _assert_same(out, cold.generate([second], _params(1))[0])


def test_chunked_prefill_stores_and_takes_logprobs_across_chunks(model_dir):
    first, second, third = _prefix_family(seed=80, prefix_len=30)
    chunked_cold = _engine(model_dir, caching=False, max_num_batched_tokens=8)
    warm = _engine(model_dir, max_num_batched_tokens=8)
    stored = warm.generate([first], _params(3))[0]
    for p in (second, third):
        out = warm.generate([p], _params(3))[0]
        _assert_from_cache(out, stored, 28)
        _assert_same(out, chunked_cold.generate([p], _params(3))[0])


def test_preemption_and_a_batch_of_choices_sharing_one_question(model_dir, cold):
    # The multiple-choice shape: one question, five continuations, in one batch after a first
    # scoring of the question; a pool too small for all at once preempts and recomputes.
    question = prompts(1, seed=90, lo=33, hi=34)[0]
    choices = [question + c for c in prompts(5, seed=91, lo=2, hi=7)]
    warm = _engine(model_dir, num_kv_blocks=32, max_num_batched_tokens=40)
    stored = warm.generate([question], _params(0, max_tokens=1))[0]
    outs = warm.generate(choices, _params(0, max_tokens=40))
    assert warm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_cached_tokens for o in outs) >= 5 * 32
    for got, want in zip(outs, cold.generate(choices, _params(0, max_tokens=40))):
        assert got.prompt_logprobs[:33] == stored.prompt_logprobs[:33]
        _assert_same(got, want)


def test_speculative_decoding_on(model_dir, cold):
    first, second, _ = _prefix_family(seed=100)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    warm = _engine(model_dir, speculative_config=spec)
    stored = warm.generate([first], _params(2, max_tokens=8))[0]
    out = warm.generate([second], _params(2, max_tokens=8))[0]
    _assert_from_cache(out, stored, 24)
    _assert_same(out, cold.generate([second], _params(2, max_tokens=8))[0])


def _closed_after(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list:
    try:
        return [llm.generate([p], params)[0] for p, params in requests]
    finally:
        llm.close()


def test_two_ranks(model_dir):
    # Every rank keeps the hidden states of its blocks and runs the vocab-parallel LM head on them.
    first, second, _ = _prefix_family(seed=110)
    (cold,) = _closed_after(_engine(model_dir, caching=False, tensor_parallel_size=2), [(second, _params(2))])
    stored, out = _closed_after(_engine(model_dir, tensor_parallel_size=2), [(first, _params(2)), (second, _params(2))])
    _assert_from_cache(out, stored, 24)
    _assert_same(out, cold)


def test_lm_eval_requests_through_the_server(model_dir, cold):
    """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1 or 0) on a shared context:
    the second choice is scored from the cache, with the logprobs of a cold engine."""
    import sys
    from pathlib import Path

    from openai import OpenAI

    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from harness import ServerThread

    context, choice_a, choice_b = _prefix_family(seed=120)
    with ServerThread(model_dir(ARCH, with_tokenizer=True), block_size=BLOCK) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        allocate, hits = server.llm.engine.block_manager.allocate, []
        server.llm.engine.block_manager.allocate = lambda seq: allocate(seq) or hits.append(seq.num_cached_tokens)
        for prompt, max_tokens in ((choice_a, 1), (choice_b, 1), (choice_b, 0)):
            out = c.completions.create(model=server.state.model_name, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, logprobs=1, echo=True)
            want = cold.generate([prompt], _params(1, max_tokens=1))[0]
            got = out.choices[0].logprobs.token_logprobs[: len(prompt)]
            assert got[0] is None and got[1:] == pytest.approx(
                [e[t].logprob for e, t in zip(want.prompt_logprobs[1:], prompt[1:])], abs=2e-5, rel=0)
    assert hits[0] == 0 and hits[1] == 24 and hits[2] >= 24
