"""Multi-step decoding (num_decode_steps > 1): several greedy forwards per engine step, the inputs
advanced on the device in between. Every output must be token-identical to one step at a time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
from tiny_models import NEW_TOKENS, prompts

from engine import LLM, AsyncLLM, SamplingParams
from engine.block_manager import BlockManager, block_hash
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from kernels.gemv import SMALL_M

STEPS = (1, 4, 8)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def generate(path, token_prompts, params, steps, **cfg):
    cfg = {"device": "cpu", "max_model_len": 256, "block_size": 4, **cfg}
    llm = LLM(path, num_decode_steps=steps, **cfg)
    outs = llm.generate(token_prompts, params)
    assert all(o.error is None for o in outs)
    return llm, outs


def summary(outs):
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs]


def check_hashes_at_free(llm):
    """Every block hash a sequence registered covers tokens it keeps, and only computed ones:
    checked when its blocks are freed (after the tokens dropped past its finish are gone)."""
    bm = llm.engine.block_manager
    inner = bm.deallocate

    def checked(seq):
        hashes = bm.seq_hashes.get(seq.seq_id, [])
        assert len(hashes) * bm.block_size <= seq.num_computed_tokens <= seq.num_tokens
        prev = b""
        for i, h in enumerate(hashes):
            prev = block_hash(prev, seq.block_tokens(i, bm.block_size))
            assert h == prev
        inner(seq)

    bm.deallocate = checked


def test_steps_agree_with_each_other_and_transformers(model_dir, mixed_prompts, hf_reference):
    # Staggered max_tokens: sequences finish at every offset inside a multi-step.
    path = model_dir("llama_gqa_untied")
    params = [SamplingParams(temperature=0.0, max_tokens=1 + i % NEW_TOKENS, ignore_eos=True)
              for i in range(len(mixed_prompts))]
    ref = hf_reference("llama_gqa_untied", mixed_prompts)
    for steps in STEPS:
        llm, outs = generate(path, mixed_prompts, params, steps, max_num_batched_tokens=96)
        assert [o.token_ids for o in outs] == [r[: p.max_tokens] for r, p in zip(ref, params)]
        assert all(o.finish_reason == "length" for o in outs)
        assert (llm.engine.num_multi_steps > 0) == (steps > 1)
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def eos_model(model_dir, root, eos: list[int]) -> str:
    """The tiny model with these EOS ids (in config.json and generation_config.json)."""
    path = os.path.join(root, "eos-" + "-".join(map(str, eos)))
    if not os.path.exists(path):
        shutil.copytree(model_dir("qwen2_bias"), path)
        for name in ("config.json", "generation_config.json"):
            f = os.path.join(path, name)
            if os.path.exists(f):
                with open(f) as fh:
                    cfg = json.load(fh)
                cfg["eos_token_id"] = eos
                with open(f, "w") as fh:
                    json.dump(cfg, fh)
    return path


def first_stop(tokens, stops):
    """The reference cut after its first stop token, and whether it had one."""
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1], True
    return tokens, False


def test_eos_and_stop_token_ids_mid_steps(model_dir, tmp_path, hf_reference):
    ps = prompts(16, seed=21, lo=2, hi=30)
    ref = hf_reference("qwen2_bias", ps, 16)
    # EOS ids that the reference really produces, at various offsets (the 3rd token of some
    # outputs, the 7th of others); stop_token_ids likewise from other outputs.
    eos = sorted({ref[0][2], ref[1][6], 2})
    stop_ids = [ref[2][4], ref[3][9]]
    path = eos_model(model_dir, str(tmp_path), eos)
    params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=stop_ids)
    expected = []
    for r in ref:
        cut, stopped = first_stop(r, set(eos) | set(stop_ids))
        expected.append((cut, "stop" if stopped else "length"))
    results = []
    for steps in STEPS:
        llm, outs = generate(path, ps, params, steps)
        assert [(o.token_ids, o.finish_reason) for o in outs] == expected
        for o in outs:  # a stop token id is reported; EOS is not
            if o.finish_reason == "stop":
                last = o.token_ids[-1]
                assert o.stop_reason == (None if last in eos else last)
        results.append(summary(outs))
    assert results[0] == results[1] == results[2]
    assert sum(e[1] == "stop" for e in expected) >= 4  # the test really stops mid-way


def test_min_tokens_holds_eos_back_then_multi_step_resumes(model_dir, tmp_path):
    ps = prompts(8, seed=22, lo=2, hi=30)
    base = generate(model_dir("qwen2_bias"), ps, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), 1)[1]
    eos = sorted({base[0].token_ids[1], base[1].token_ids[3], base[2].token_ids[12]})
    path = eos_model(model_dir, str(tmp_path), eos)
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5)
    results = []
    for steps in STEPS:
        llm, outs = generate(path, ps, params, steps)
        assert all(len(o.token_ids) >= 5 for o in outs)
        assert (llm.engine.num_multi_steps > 0) == (steps > 1)
        results.append(summary(outs))
    assert results[0] == results[1] == results[2]
    assert any(r[2] == "stop" for r in results[0])


def test_stop_strings_mid_steps(model_dir):
    path = model_dir("llama_mha_tied", with_tokenizer=True)
    ps = prompts(12, seed=23, lo=2, hi=30)
    free = generate(path, ps, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), 1)[1]
    # Stop strings cut from the texts: a character pair from several outputs, at several offsets.
    stops = [o.text[3 + i : 5 + i] for i, o in enumerate(free[:4]) if len(o.text) >= 6 + i]
    assert stops
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=stops)
    results = []
    for steps in STEPS:
        llm, outs = generate(path, ps, params, steps)
        assert (llm.engine.num_multi_steps > 0) == (steps > 1)
        results.append(summary(outs))
    assert results[0] == results[1] == results[2]
    assert sum(r[2] == "stop" for r in results[0]) >= 2
    for (tokens, text, reason, stop), f in zip(results[0], free):
        assert f.token_ids[: len(tokens)] == tokens  # a stop only cuts the free-running output short


def test_tiny_pool_falls_back_and_preempts(model_dir, mixed_prompts, hf_reference):
    # 64 blocks of 4 tokens for 32 sequences of up to ~80 tokens: multi-step often finds no room
    # for all its slots (one step then), and single steps must preempt.
    ref = hf_reference("qwen3_qknorm", mixed_prompts)
    for steps in STEPS:
        llm, outs = generate(model_dir("qwen3_qknorm"), mixed_prompts, GREEDY, steps, num_kv_blocks=64,
                             max_num_batched_tokens=128)
        assert [o.token_ids for o in outs] == ref
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_free_blocks == 64


def test_no_room_for_all_steps_means_one_step():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, 8, 64, num_decode_steps=8, max_model_len=64)
    seqs = [Sequence(list(range(3, 10)), SamplingParams(temperature=0.0, max_tokens=20)) for _ in range(2)]
    for s in seqs:  # 7 tokens each: 2 blocks, prefilled
        bm.allocate(s)
        s.num_computed_tokens, s.in_prefill = s.num_tokens - 1, False
        sched.running.append(s)
    # 8 steps need blocks for 7 + 7 = 14 tokens each (4 blocks): 4 more in all, 2 free.
    batch = sched.schedule()
    assert batch.num_steps == 1 and [len(s.block_table) for s in seqs] == [2, 2]
    bm.deallocate(seqs[1])
    sched.running.remove(seqs[1])
    batch = sched.schedule()  # 2 more blocks for the one left: they fit
    assert batch.num_steps == 8 and len(seqs[0].block_table) == 4 and bm.num_free_blocks == 2


def test_steps_limited_by_max_model_len_and_max_tokens():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, 8, 64, num_decode_steps=8, max_model_len=20)
    s = Sequence(list(range(3, 18)), SamplingParams(temperature=0.0, max_tokens=4))
    bm.allocate(s)
    s.num_computed_tokens, s.in_prefill = s.num_tokens - 1, False
    sched.running.append(s)
    assert sched.schedule().num_steps == 4  # max_tokens: 4 left
    s.params.max_tokens = 100
    assert sched.schedule().num_steps == 5  # 15 tokens + 5 = max_model_len
    sched.add(Sequence([5, 6], SamplingParams()))
    sched.max_num_seqs = 1  # it cannot be admitted, so it waits
    assert sched.schedule().num_steps == 1


def test_prefix_caching_hashes_only_kept_tokens(model_dir, hf_reference):
    # Shared prefixes, run twice; max_tokens not a multiple of the steps, so sequences finish
    # inside a multi-step and drop tokens whose K/V sits in their last block. Then prompts that
    # extend finished sequences by their own outputs must hit the cache and still match.
    shared = prompts(3, seed=7, lo=20, hi=40)
    tails = prompts(18, seed=8, lo=1, hi=12)
    token_prompts = [shared[i % 3] + tails[i] for i in range(18)]
    ref = hf_reference("llama_mha_tied", token_prompts)
    # Staggered max_tokens: in one multi-step some sequences need fewer tokens than others.
    params = [SamplingParams(temperature=0.0, max_tokens=5 + i % 7, ignore_eos=True) for i in range(18)]
    llm = LLM(model_dir("llama_mha_tied"), device="cpu", max_model_len=256, block_size=4,
              max_num_batched_tokens=64, num_decode_steps=8)
    check_hashes_at_free(llm)
    first = llm.generate(token_prompts, params)
    second = llm.generate(token_prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == [r[: p.max_tokens] for r, p in zip(ref, params)]
    assert all(o.num_cached_tokens >= 16 for o in second)
    assert llm.engine.num_multi_steps > 0
    extended = [p + o.token_ids + tails[i][:3] for i, (p, o) in enumerate(zip(token_prompts, first))]
    third = llm.generate(extended, GREEDY)
    assert [o.token_ids for o in third] == hf_reference("llama_mha_tied", extended)
    # Every full block of a finished sequence's computed tokens (all but its last) was hashed.
    assert [o.num_cached_tokens for o in third] == [(len(p) + len(o.token_ids) - 1) // 4 * 4
                                                    for p, o in zip(token_prompts, first)]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_requests_arriving_while_others_decode(model_dir, hf_reference):
    # Requests join every few steps, three at a time; with max_num_seqs=2 some wait for a free
    # row, and while any does, a decode step runs one forward (multi-step never delays an admission).
    path = model_dir("mistral")
    ps = prompts(8, seed=24, lo=3, hi=40)
    ref = hf_reference("mistral", ps, 20)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm = LLM(path, device="cpu", max_model_len=256, block_size=4, max_num_seqs=2, num_decode_steps=8)
    eng = llm.engine
    inner, seen = eng.scheduler.schedule, []

    def schedule():
        batch = inner()
        if batch is not None and not batch.is_prefill:
            seen.append((bool(eng.scheduler.waiting), batch.num_steps))
        return batch

    eng.scheduler.schedule = schedule
    outs, pending = {}, list(enumerate(ps))
    while pending or eng.has_unfinished_requests():
        if pending and eng.num_steps % 4 == 0:  # three at a time: more than max_num_seqs
            for i, p in pending[:3]:
                eng.add_request(p, params, str(i))
            pending = pending[3:]
        for seq in eng.step():
            if seq.is_finished:
                outs[int(seq.request_id)] = seq.output_token_ids
        if not eng.has_unfinished_requests() and pending:
            eng.num_steps += 1  # idle: let the next request in
    assert [outs[i] for i in range(len(ps))] == ref
    assert any(w for w, _ in seen) and all(k == 1 for w, k in seen if w)
    assert any(k > 1 for _, k in seen)


def test_max_model_len_reached_inside_steps(model_dir, hf_reference):
    ps = prompts(10, seed=25, lo=24, hi=38)
    ref = hf_reference("llama3_rope_mqa", ps, 16)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    for steps in STEPS:
        _, outs = generate(model_dir("llama3_rope_mqa"), ps, params, steps, max_model_len=40)
        assert [o.token_ids for o in outs] == [r[: 40 - len(p)] for r, p in zip(ref, ps)]
        assert all(o.finish_reason == "length" for o in outs)


def test_async_streaming_with_steps(model_dir):
    path = model_dir("llama_mha_tied", with_tokenizer=True)
    ps = prompts(4, seed=26, lo=5, hi=25)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    expected = LLM(path, device="cpu", max_model_len=128, block_size=4, num_decode_steps=1).generate(ps, params)
    engine = AsyncLLM(path, device="cpu", max_model_len=128, block_size=4, num_decode_steps=4)

    async def collect(p):
        tokens, text, sizes = [], "", []
        async for delta in engine.generate(p, params):
            tokens += delta.token_ids
            text += delta.text
            sizes.append(len(delta.token_ids))
        return tokens, text, sizes

    async def main():
        res = await asyncio.gather(*(collect(p) for p in ps))
        await engine.shutdown()
        return res

    results = asyncio.run(main())
    for (tokens, text, sizes), out in zip(results, expected):
        assert tokens == out.token_ids and text == out.text
        assert max(sizes) > 1 and max(sizes) <= 4  # several tokens per delta, at most one step's
    assert engine.engine.num_multi_steps > 0


def test_device_advance_equals_a_fresh_build(model_dir):
    # The on-device greedy advance (unpadded for eager, padded as in a CUDA-graph bucket) must
    # leave exactly the inputs DecodeInputs.prepare would build after appending the argmax tokens, and
    # record each step's tokens in its row of the [steps, rows] buffer.
    from test_model_runner import check_decode_inputs
    import torch

    llm = LLM(model_dir("llama_gqa_untied"), device="cpu", max_model_len=64, block_size=4, num_kv_blocks=64,
              enable_prefix_caching=False)
    runner, bm = llm.engine.runner, llm.engine.block_manager
    vocab = llm.engine.vocab_size
    # Lengths at, just before and past block boundaries; 3 steps cross into new blocks.
    seqs = [Sequence(list(range(3, 3 + n)), SamplingParams(temperature=0.0)) for n in (4, 7, 8, 13)]
    for s in seqs:
        bm.allocate(s)
        bm.may_append(s, 7)  # room for both passes of 3 steps
    g = torch.Generator().manual_seed(0)
    for rows in (4, 6):
        runner.decode_inputs.prepare(seqs, rows)
        out = torch.full((3, rows), -7, dtype=torch.int64)
        for step in range(3):
            logits = torch.randn(rows, vocab, generator=g)
            runner.decode_inputs.advance(logits, rows, out)
            want = logits.argmax(dim=-1)
            assert out[step, :4].tolist() == want[:4].tolist()
            for i, s in enumerate(seqs):
                s.append_token(int(want[i]))
            check_decode_inputs(runner, seqs, rows)
        assert (out[:, 4:] == -7).all()  # padding rows record nothing


# -- GPU: CUDA graphs with the captured advance -----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_cuda_graph_steps_equal_single_steps_in_bf16(model_dir, batch):
    # bf16, so any difference in what the forwards see would show. 5 sequences run in the bucket
    # of 8: its padding rows must keep storing nothing while the real rows advance. Staggered
    # max_tokens: rows finish inside a multi-step and the batch shrinks into smaller buckets.
    # Graphs and eager are each compared with their own single steps (bucket shapes differ).
    import torch

    path = model_dir("llama3_rope_mqa")
    g = torch.Generator().manual_seed(5)
    ps = torch.randint(3, 256, (batch, 20), generator=g).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=30 + 3 * i, ignore_eos=True) for i in range(batch)]
    # A fixed pool: two engines live at once here, and a pool sized from free memory takes 90% of it.
    # fused_decode_rows pinned: each engine would time it apart, and one path at each batch size.
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256, block_size=16, enable_prefix_caching=False,
              max_num_seqs=16, cuda_graph_max_bs=16, kv_cache_tokens=16384, fused_decode_rows=SMALL_M)
    for eager in (False, True):
        single = LLM(path, **kw, enforce_eager=eager, num_decode_steps=1).generate(ps, params)
        llm = LLM(path, **kw, enforce_eager=eager, num_decode_steps=8)
        assert bool(llm.engine.runner.graphs) != eager
        multi = llm.generate(ps, params)
        assert [o.token_ids for o in multi] == [o.token_ids for o in single]
        assert llm.engine.num_multi_steps > 0
