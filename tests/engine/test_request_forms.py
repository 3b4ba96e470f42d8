"""What LLM.generate and AsyncLLM accept: the prompt forms vLLM users write (text, token ids of any
integer type, {"prompt": ...} / {"prompt_token_ids": ...} dicts), one prompt or a list, one
SamplingParams or one per prompt; and a clear error for what they do not (issue 11, finding 12)."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from engine import LLM, AsyncLLM, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
TEXT = "Hello, world"


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir("llama_mha_tied", with_tokenizer=True), device="cpu", max_model_len=64, block_size=4)


def test_every_prompt_form_gives_the_same_output(llm):
    ids = llm.tokenizer.encode(TEXT)
    forms = [TEXT, ids, tuple(ids), np.array(ids, dtype=np.int64), [np.int64(t) for t in ids],
             np.array(ids, dtype=np.int32), {"prompt": TEXT}, {"prompt_token_ids": ids},
             {"prompt_token_ids": np.array(ids)}]
    outs = llm.generate(forms, GREEDY)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    assert all(o.prompt_token_ids == ids and type(o.prompt_token_ids[0]) is int for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 1 and len(outs[0].token_ids) == 5
    for one in forms:  # each form alone is one prompt
        single = llm.generate(one, GREEDY)
        assert len(single) == 1 and single[0].token_ids == outs[0].token_ids


def test_one_sampling_params_per_prompt(llm):
    ids = llm.tokenizer.encode(TEXT)
    outs = llm.generate([ids, {"prompt": TEXT}], [GREEDY, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [5, 2] and outs[1].token_ids == outs[0].token_ids[:2]
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 sampling params"):
        llm.generate([ids, ids], [GREEDY])


@pytest.mark.parametrize("prompt, message", [
    ({"text": TEXT}, "'prompt' or 'prompt_token_ids'"),
    ({"prompt": TEXT, "prompt_token_ids": [1]}, "'prompt' or 'prompt_token_ids'"),
    ({"prompt": [1, 2]}, "'prompt' must be text"),
    ({"prompt_token_ids": TEXT}, "must be token ids"),
    ([1.0, 2.0], "token ids must be integers, got 1.0"),
    (np.array([1.5, 2.0]), "token ids must be integers"),
    ([1, True], "token ids must be integers, got True"),
    (3.5, "got float"),
])
def test_bad_prompt_forms_name_the_problem(llm, prompt, message):
    out = llm.generate([prompt, TEXT], GREEDY)
    assert out[0].finish_reason == "error" and "prompt" in out[0].error and message in out[0].error
    assert out[1].error is None and len(out[1].token_ids) == 5


def test_a_dict_as_sampling_params_is_refused_with_a_hint(llm):
    with pytest.raises(InvalidRequestError, match=r"got dict; write SamplingParams\(\*\*params\)"):
        llm.generate([TEXT, TEXT], {"temperature": 0, "max_tokens": 5})
    outs = llm.generate([TEXT, TEXT], [GREEDY, {"temperature": 0}])
    assert outs[0].error is None
    assert "sampling_params" in outs[1].error and "expected SamplingParams, got dict" in outs[1].error
    assert not llm.engine.seqs and not llm.engine.has_unfinished_requests()


def test_async_accepts_the_same_forms(model_dir, llm):
    engine = AsyncLLM(model_dir("llama_mha_tied", with_tokenizer=True), device="cpu", max_model_len=64, block_size=4)
    ids = llm.tokenizer.encode(TEXT)
    expected = llm.generate(ids, GREEDY)[0].token_ids

    async def collect(prompt):
        return [t async for d in engine.generate(prompt, GREEDY) for t in d.token_ids]

    async def main():
        got = await asyncio.gather(*(collect(p) for p in ({"prompt": TEXT}, np.array(ids), {"prompt_token_ids": ids})))
        with pytest.raises(InvalidRequestError, match="sampling_params"):
            async for _ in engine.generate(TEXT, {"temperature": 0}):
                pass
        await engine.shutdown()
        return got

    assert asyncio.run(main()) == [expected] * 3


def test_a_model_directory_without_config_json_is_named(model_dir, tmp_path):
    path = tmp_path / "no_config"
    shutil.copytree(model_dir("llama_mha_tied"), path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=f"model: {path}.* has no config.json"):
        LLM(str(path), device="cpu")
