"""Bad requests fail alone with an error naming the field; the other requests complete."""

from __future__ import annotations

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
