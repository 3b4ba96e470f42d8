"""Bad requests fail alone with an error naming the field; the other requests complete."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from tiny_models import prompts

from engine import LLM, InvalidRequestError, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir("qwen2_bias"), device="cpu", max_model_len=64, block_size=4)


def test_each_bad_request_fails_alone(llm):
    good = prompts(3, seed=21, lo=5, hi=20)
    cases = [
        ([], OK, "prompt"),
        (list(range(3, 67)), OK, "prompt"),  # 64 tokens: no room for one more under max_model_len=64
        (good[0], SamplingParams(max_tokens=0), "max_tokens"),
        (good[0], SamplingParams(top_p=0.0), "top_p"),
        (good[0], SamplingParams(top_p=1.5), "top_p"),
        (good[0], SamplingParams(temperature=-0.1), "temperature"),
        (good[0], SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        ([3, 999], OK, "prompt"),  # token id outside the vocabulary
    ]
    batch = [good[0]] + [c[0] for c in cases] + [good[1], good[2]]
    params = [OK] + [c[1] for c in cases] + [OK, OK]
    outs = llm.generate(batch, params)
    alone = llm.generate(good, OK)
    assert [o.token_ids for o in (outs[0], outs[-2], outs[-1])] == [o.token_ids for o in alone]
    assert all(o.error is None and len(o.token_ids) == 6 for o in (outs[0], outs[-2], outs[-1]))
    for out, (_, _, field) in zip(outs[1:-2], cases):
        assert out.finish_reason == "error" and out.token_ids == []
        assert field in out.error
    assert not llm.engine.has_unfinished_requests()


def test_add_request_raises_with_field(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request([5, 6], SamplingParams(top_p=0))
    assert e.value.field == "top_p" and "top_p" in str(e.value)
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.engine.add_request("text needs a tokenizer", OK)  # this model dir has none


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("params, field", [
    (SamplingParams(temperature=NAN), "temperature"),
    (SamplingParams(temperature=INF), "temperature"),
    (SamplingParams(temperature="0.5"), "temperature"),
    (SamplingParams(top_p=NAN), "top_p"),
    (SamplingParams(min_p=NAN), "min_p"),
    (SamplingParams(min_p=-INF), "min_p"),
    (SamplingParams(top_k=2.5), "top_k"),
    (SamplingParams(top_k=True), "top_k"),
    (SamplingParams(top_k=NAN), "top_k"),
    (SamplingParams(max_tokens=4.0), "max_tokens"),
    (SamplingParams(min_tokens=1.5), "min_tokens"),
    (SamplingParams(seed=1.5), "seed"),
    (SamplingParams(seed=2**64), "seed"),  # seeds are 64-bit words
    (SamplingParams(seed=-(2**63) - 1), "seed"),
    (SamplingParams(stop_token_ids=[1.5]), "stop_token_ids"),
    (SamplingParams(stop_token_ids=7), "stop_token_ids"),
    (SamplingParams(stop=5), "stop"),
    (SamplingParams(stop=["ok", None]), "stop"),
    (SamplingParams(ignore_eos="yes"), "ignore_eos"),
    (SamplingParams(logprobs=2.5), "logprobs"),
    (SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_sampling_fields_are_checked_for_type_and_range(llm, params, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request([5, 6], params)
    assert e.value.field == field and field in str(e.value)
    assert not llm.engine.seqs and not llm.engine.has_unfinished_requests()


def test_numpy_scalars_are_accepted_as_sampling_fields(llm):
    p = prompts(1, seed=22, lo=5, hi=10)[0]
    ref = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, top_k=3, ignore_eos=True))[0]
    params = SamplingParams(temperature=np.float32(0), max_tokens=np.int64(5), top_k=np.int32(3),
                            ignore_eos=np.bool_(True), stop_token_ids=[np.int64(0)], logprobs=np.int64(2),
                            prompt_logprobs=np.int16(1), seed=np.uint64(7), min_p=Fraction(0))
    out = llm.generate([p], params)[0]
    assert out.error is None and out.token_ids[: len(ref.token_ids)] == ref.token_ids[: len(out.token_ids)]
    assert len(out.logprobs) == len(out.token_ids) and all(len(lp) >= 2 for lp in out.logprobs)
    assert len(out.prompt_logprobs) == len(p)
    seeded = SamplingParams(temperature=np.float32(1.0), seed=np.int64(3), min_p=Fraction(1, 100), top_k=np.int8(50),
                            max_tokens=5, ignore_eos=True)
    assert llm.generate([p], seeded)[0].token_ids == llm.generate([p], SamplingParams(
        temperature=1.0, seed=3, min_p=0.01, top_k=50, max_tokens=5, ignore_eos=True))[0].token_ids


class _Unreadable(list):
    """A prompt whose reading raises something other than InvalidRequestError."""

    def __iter__(self):
        raise RuntimeError("unreadable prompt")


def test_a_bad_prompt_of_any_kind_leaves_nothing_queued(llm, monkeypatch):
    """Everything is validated before anything is added: a prompt that raises (TypeError on None,
    any exception type) fails alone, and no request is left behind for the next generate."""
    good = prompts(6, seed=23, lo=5, hi=20)
    expected = llm.generate(good, OK)
    outs = llm.generate(good[:3] + [None, _Unreadable([1, 2])] + good[3:], OK)
    assert [o.token_ids for o in outs[:3] + outs[5:]] == [o.token_ids for o in expected]
    assert "prompt" in outs[3].error and "unreadable prompt" in outs[4].error
    assert all(o.finish_reason == "error" for o in outs[3:5])
    engine = llm.engine
    assert not engine.seqs and not engine.scheduler.waiting and not engine.scheduler.running

    processed: set[str] = set()
    step = engine.step

    def counting_step():
        touched = step()
        processed.update(seq.request_id for seq in touched)
        return touched

    monkeypatch.setattr(engine, "step", counting_step)
    assert llm.generate(good[0], OK)[0].token_ids == expected[0].token_ids
    assert len(processed) == 1  # the one prompt, nothing left over from the failed call
