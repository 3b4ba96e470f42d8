"""A failure that belongs to one request ends that request alone (issue 11, finding 5).

Logprob counts are bounded at add time by the engine's ``max_logprobs``; anything that still goes
wrong in one request's part of a step (its stop check, detokenization, output building) finishes
that request with ``finish_reason == "error"`` while the rest of the batch runs on.
"""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import prompts

from engine import LLM, AsyncLLM, InvalidRequestError, RequestFailedError, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir("llama_gqa_untied", with_tokenizer=True), device="cpu", max_model_len=64, block_size=4)


def assert_idle(engine) -> None:
    assert not engine.seqs and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_logprobs_above_max_logprobs_fail_alone(llm):
    good = prompts(3, seed=41, lo=5, hi=20)
    bad = [SamplingParams(temperature=0, max_tokens=6, logprobs=100000),
           SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=21)]
    outs = llm.generate(good[:1] + [good[1]] * 2 + good[2:], [OK, *bad, OK])
    assert [o.error for o in (outs[0], outs[3])] == [None, None]
    assert [o.token_ids for o in (outs[0], outs[3])] == [o.token_ids for o in llm.generate([good[0], good[2]], OK)]
    for out, field in zip(outs[1:3], ("logprobs", "prompt_logprobs")):
        assert out.finish_reason == "error" and field in out.error and "max_logprobs (20)" in out.error
    at_limit = llm.generate([good[1]], SamplingParams(temperature=0, max_tokens=3, logprobs=20, prompt_logprobs=20))[0]
    assert at_limit.error is None and all(len(lp) >= 20 for lp in at_limit.logprobs)
    assert_idle(llm.engine)


def test_max_logprobs_is_an_engine_setting(model_dir):
    path = model_dir("llama_gqa_untied")
    llm = LLM(path, device="cpu", max_model_len=64, block_size=4, max_logprobs=30)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, logprobs=25))[0]
    assert out.error is None and all(len(lp) >= 25 for lp in out.logprobs)
    with pytest.raises(InvalidRequestError, match="max_logprobs"):
        llm.engine.add_request([5, 6, 7], SamplingParams(logprobs=31))
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(path, device="cpu", max_logprobs=-1)


def _break_for(monkeypatch, engine, method: str, victim: SamplingParams) -> None:
    """Make ``engine.<method>(seq, ...)`` raise for the victim's sequence only."""
    original = getattr(engine, method)

    def broken(seq, *args):
        if seq.params is victim:
            raise RuntimeError(f"{method} broke")
        return original(seq, *args)

    monkeypatch.setattr(engine, method, broken)


@pytest.mark.parametrize("num_decode_steps", [1, 4])  # single-token steps and multi-step decode
@pytest.mark.parametrize("method", ["_check_stop", "detokenize"])
def test_a_failure_inside_a_step_ends_that_request_alone(model_dir, monkeypatch, method, num_decode_steps):
    llm = LLM(model_dir("llama_gqa_untied", with_tokenizer=True), device="cpu", max_model_len=64, block_size=4,
              num_decode_steps=num_decode_steps)
    good = prompts(4, seed=42, lo=5, hi=20)
    expected = llm.generate(good, OK)
    victim = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    _break_for(monkeypatch, llm.engine, method, victim)
    outs = llm.generate(good[:2] + [good[0]] + good[2:], [OK, OK, victim, OK, OK])
    assert outs[2].finish_reason == "error" and f"{method} broke" in outs[2].error
    others = outs[:2] + outs[3:]
    assert [o.token_ids for o in others] == [o.token_ids for o in expected]
    assert [o.text for o in others] == [o.text for o in expected]
    assert all(o.error is None and o.finish_reason == "length" for o in others)
    assert_idle(llm.engine)
    assert llm.generate(good[:1], OK)[0].token_ids == expected[0].token_ids  # the engine goes on


@pytest.mark.parametrize("method", ["_check_stop", "detokenize"])  # in the step; building a delta
def test_async_failure_ends_only_that_stream(model_dir, monkeypatch, method):
    path = model_dir("llama_gqa_untied", with_tokenizer=True)
    good = prompts(3, seed=43, lo=5, hi=20)
    expected = LLM(path, device="cpu", max_model_len=64, block_size=4).generate(good, OK)
    engine = AsyncLLM(path, device="cpu", max_model_len=64, block_size=4)
    victim = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    _break_for(monkeypatch, engine.engine, method, victim)

    async def collect(p, params):
        tokens = []
        try:
            async for delta in engine.generate(p, params):
                tokens += delta.token_ids
        except RequestFailedError as e:
            return e
        return tokens

    async def main():
        results = await asyncio.gather(*(collect(p, OK) for p in good), collect(good[0], victim))
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    assert results[:3] == [o.token_ids for o in expected]
    assert isinstance(results[3], RequestFailedError) and f"{method} broke" in str(results[3])
    assert_idle(engine.engine)


def test_an_engine_failure_fails_the_call_and_leaves_nothing_behind(llm, monkeypatch):
    """A failure of the batched forward is not one request's: generate raises, after aborting
    every request of the call, and the engine serves the next call normally."""
    good = prompts(3, seed=44, lo=5, hi=20)
    expected = llm.generate(good, OK)
    run = llm.engine.runner.run
    calls = 0

    def failing_second_step(batch):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("device lost")
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", failing_second_step)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(good, OK)
    assert_idle(llm.engine)
    assert [o.token_ids for o in llm.generate(good, OK)] == [o.token_ids for o in expected]
