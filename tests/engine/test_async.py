"""AsyncLLM: per-request async iterators of deltas; leaving early aborts the request."""

from __future__ import annotations

import asyncio
import contextlib

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
    assert bm.num_free_blocks == bm.num_blocks


def test_finished_streams_leave_nothing_behind_and_ids_can_be_reused(model_dir):
    """Issue 11 finding 7: a queue was kept per finished request, and its request_id refused forever."""
    path = model_dir("llama_mha_tied", with_tokenizer=True)
    ps = prompts(3, seed=32, lo=5, hi=25)
    expected = LLM(path, device="cpu", max_model_len=128, block_size=4).generate(ps, PARAMS)
    engine = AsyncLLM(path, device="cpu", max_model_len=128, block_size=4)
    long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)

    async def collect(p, request_id, params=PARAMS):
        return [t async for d in engine.generate(p, params, request_id) for t in d.token_ids]

    async def cancel_after_one(p, request_id):
        async with contextlib.aclosing(engine.generate(p, long, request_id)) as stream:
            async for _ in stream:
                break  # leaving the aclosing block closes the stream now (a bare break: when collected)

    async def main():
        first = await asyncio.gather(*(collect(p, f"r{i}") for i, p in enumerate(ps)))
        assert engine.active_request_ids == set()
        again = await asyncio.gather(*(collect(p, f"r{i}") for i, p in enumerate(ps)))  # finished ids are free
        await cancel_after_one(ps[0], "c")  # a cancelled id is free at once: no delta of the old
        reused = await collect(ps[1], "c")  # stream may reach the new one
        holder = engine.generate(ps[2], long, "busy")
        await holder.__anext__()
        with pytest.raises(InvalidRequestError, match="request_id"):  # one in flight is still refused
            await engine.generate(ps[0], PARAMS, "busy").__anext__()
        engine.abort("busy")  # ends the open stream with a finished "abort" delta
        rest = [d async for d in holder]
        assert rest[-1].finished and rest[-1].finish_reason == "abort" and rest[-1].request_id == "busy"
        for _ in range(100):  # let the loop apply the abort
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return first, again, reused

    first, again, reused = asyncio.run(main())
    assert first == again == [o.token_ids for o in expected]
    assert reused == expected[1].token_ids
    assert engine.active_request_ids == set() and not engine._queues
    assert not engine.engine.seqs and not engine.engine.has_unfinished_requests()
