"""The model runner's decode inputs: a staging buffer whose block-table rows are updated in place
must always hold what a fresh build from the sequences would."""

from __future__ import annotations

from tiny_models import NEW_TOKENS, prompts

from engine import LLM, SamplingParams


def check_decode_inputs(runner, seqs, rows):
    n, bs, h = len(seqs), runner.block_size, runner.decode_inputs.h
    assert h.ids[:n].tolist() == [s.token_ids[-1] for s in seqs]
    assert h.pos[:n].tolist() == [s.num_tokens - 1 for s in seqs]
    assert h.lens[:n].tolist() == [s.num_tokens for s in seqs]
    slots = [s.block_table[(s.num_tokens - 1) // bs] * bs + (s.num_tokens - 1) % bs for s in seqs]
    assert h.slots[:n].tolist() == slots
    for i, s in enumerate(seqs):
        assert h.tables[i, : len(s.block_table)].tolist() == s.block_table
    assert (h.slots[n:rows] == -1).all() and (h.lens[n:rows] == 1).all()


def test_decode_buffers_follow_finishes_growth_and_preemption(model_dir):
    # Blocks of 4 tokens (a new block every 4 steps), staggered max_tokens (rows shift as sequences
    # finish) and a pool small enough to preempt (tables replaced under the same sequence id; no
    # prefix cache, which could hand a recomputed sequence its old blocks back).
    llm = LLM(model_dir("llama_gqa_untied"), device="cpu", max_model_len=256, block_size=4,
              num_kv_blocks=64, max_num_batched_tokens=128, enable_prefix_caching=False)
    runner = llm.engine.runner
    inner, calls = runner.decode_inputs.prepare, []

    def checked(seqs, rows):
        inner(seqs, rows)
        check_decode_inputs(runner, seqs, rows)
        calls.append(len(seqs))

    runner.decode_inputs.prepare = checked
    ps = prompts(24, seed=5, lo=1, hi=60)
    params = [SamplingParams(temperature=0.0, max_tokens=1 + i % NEW_TOKENS, ignore_eos=True) for i in range(len(ps))]
    outs = llm.generate(ps, params)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert llm.engine.scheduler.num_preemptions > 0
    assert len(set(calls)) > 3  # the decode batch really changed size


def test_plain_greedy_fast_path_equals_the_general_sampler(model_dir):
    # Greedy rows give the same tokens whether the step takes the one-argmax path (all rows plain
    # greedy) or the general one (a row asks for logprobs, or is still under min_tokens).
    path = model_dir("qwen2_bias")
    ps = prompts(8, seed=6, lo=1, hi=30)
    plain = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    mixed = [plain if i % 2 else SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
             for i in range(len(ps))]
    a = LLM(path, device="cpu", max_model_len=128).generate(ps, plain)
    b = LLM(path, device="cpu", max_model_len=128).generate(ps, mixed)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_a_replaced_block_table_is_rewritten_after_its_prefill(model_dir):
    # Preemption frees a sequence's blocks; its recompute gets others under the same sequence id
    # and in the same decode row. The prefill step in between must make the runner forget the row.
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence

    llm = LLM(model_dir("llama_gqa_untied"), device="cpu", max_model_len=64, block_size=4,
              num_kv_blocks=32, enable_prefix_caching=False)
    runner, bm = llm.engine.runner, llm.engine.block_manager
    seq = Sequence(list(range(3, 12)), SamplingParams(temperature=0.0))
    bm.allocate(seq)
    runner.decode_inputs.prepare([seq], 1)
    old = list(seq.block_table)
    bm.deallocate(seq)
    blocker = Sequence(list(range(3, 40)), SamplingParams())
    bm.allocate(blocker)  # the free list is LRU (freed blocks go last): the new table differs anyway
    bm.allocate(seq)
    assert seq.block_table != old and len(seq.block_table) == len(old)
    runner.run(ScheduledBatch([seq], True, [seq.num_tokens]))
    runner.decode_inputs.prepare([seq], 1)
    check_decode_inputs(runner, [seq], 1)
