"""AsyncLLM: per-request async iterators of deltas; leaving early aborts the request."""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import prompts

from engine import LLM, AsyncLLM, InvalidRequestError, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_streams_concatenate_to_generate_output_and_cancel_frees_blocks(model_dir):
    path = model_dir("llama_mha_tied", with_tokenizer=True)
    ps = prompts(4, seed=31, lo=5, hi=25)
    expected = LLM(path, device="cpu", max_model_len=128, block_size=4).generate(ps, PARAMS)
    engine = AsyncLLM(path, device="cpu", max_model_len=128, block_size=4)

    async def collect(p):
        tokens, text, n = [], "", 0
        async for delta in engine.generate(p, PARAMS):
            tokens += delta.token_ids
            text += delta.text
            n += 1
            last = delta
        assert last.finished and last.finish_reason == "length"
        return tokens, text, n

    async def cancel_after_two(p):
        seen = 0
        async for _ in engine.generate(p, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)):
            seen += 1
            if seen == 2:
                break  # closes the generator: the request must be aborted
        return seen

    async def main():
        results = await asyncio.gather(*(collect(p) for p in ps), cancel_after_two(ps[0]))
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            async for _ in engine.generate(ps[0], SamplingParams(max_tokens=0)):
                pass
        for _ in range(100):  # let the loop apply the abort
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    for (tokens, text, n), out in zip(results[:4], expected):
        assert tokens == out.token_ids and text == out.text and n > 1
    assert results[4] == 2
    assert not engine.engine.has_unfinished_requests()
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == len(bm.blocks)
