"""Scheduler: token budget, chunked prefill, admission, finishing and preemption."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make(num_blocks=100, block_size=4, max_seqs=8, budget=16, chunked=True):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_seqs, budget, chunked)


def advance(sched: Scheduler, batch, token: int = 7) -> None:
    """What the engine does after the model ran: append sampled tokens, then progress."""
    samplers = [batch.samples(i) for i in range(len(batch.seqs))]
    for seq, s in zip(batch.seqs, samplers):
        if s:
            seq.append_token(token)
    sched.finish_step(batch, [int(s) for s in samplers])


def test_budget_and_chunked_prefill():
    _, sched = make(budget=16)
    a, b = Sequence(list(range(30)), SamplingParams()), Sequence(list(range(100, 105)), SamplingParams())
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a] and batch.num_scheduled == [16]
    assert not batch.samples(0)
    advance(sched, batch)
    batch = sched.schedule()  # a's remaining 14, then b's first 2
    assert batch.seqs == [a, b] and batch.num_scheduled == [14, 2]
    assert batch.samples(0) and not batch.samples(1)
    advance(sched, batch)
    assert a.num_tokens == 31 and not a.in_prefill
    batch = sched.schedule()  # b still prefilling: prefill comes first
    assert batch.is_prefill and batch.seqs == [b] and batch.num_scheduled == [3]
    advance(sched, batch)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a, b] and batch.num_scheduled == [1, 1]


def test_no_chunking_keeps_prompts_whole():
    _, sched = make(budget=32, chunked=False)
    seqs = [Sequence(list(range(20)), SamplingParams()) for _ in range(2)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [seqs[0]] and batch.num_scheduled == [20]


def test_max_num_seqs_limits_admission():
    _, sched = make(max_seqs=2, budget=100)
    seqs = [Sequence([1, 2, 3], SamplingParams()) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2] and len(sched.waiting) == 1


def test_finished_sequences_leave_at_once_and_free_blocks():
    bm, sched = make(num_blocks=4)
    a = Sequence([1, 2, 3], SamplingParams())
    sched.add(a)
    advance(sched, sched.schedule())
    a.status = SequenceStatus.FINISHED
    assert sched.remove_finished() == [a]
    assert sched.running == [] and bm.num_free_blocks == 4 and not sched.has_unfinished()


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm, sched = make(num_blocks=3, block_size=4, budget=100)
    a, b = Sequence([1, 2, 3, 4], SamplingParams()), Sequence([5, 6, 7, 8], SamplingParams())
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # both prefilled; each has 5 tokens and needs a second block
    batch = sched.schedule()  # decode: a gets the last free block, b is preempted
    assert not batch.is_prefill and batch.seqs == [a]
    assert list(sched.waiting) == [b] and b.status == SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_tokens == 5  # output kept
    assert sched.num_preemptions == 1 and bm.num_free_blocks == 1


def test_abort_frees_blocks():
    bm, sched = make(num_blocks=4)
    a = Sequence([1, 2, 3, 4, 5], SamplingParams())
    sched.add(a)
    sched.schedule()
    sched.abort(a)
    assert a.finish_reason == "abort" and bm.num_free_blocks == 4 and not sched.has_unfinished()


def test_finish_step_counts_the_tokens_each_sequence_kept_and_releases_the_rest():
    # A decode step that reserved 8 tokens' slots per sequence; one sequence kept all 8, the other
    # only 2 (a step proposing several tokens may keep fewer without finishing): each advances by
    # what it kept, and the second gives back the block reserved for tokens it did not keep.
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, 8, 64, True, num_decode_steps=8, max_model_len=64)
    a, b = Sequence([1, 2, 3], SamplingParams(temperature=0.0)), Sequence([4, 5, 6], SamplingParams(temperature=0.0))
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    batch = sched.schedule()
    assert not batch.is_prefill and batch.num_steps == 8
    assert len(a.block_table) == len(b.block_table) == 3  # 4 tokens each: positions 3..10 reserved
    a.token_ids.extend(range(10, 18))
    b.token_ids.extend([20, 21])
    sched.finish_step(batch, [8, 2])
    assert a.num_computed_tokens == 3 + 8 == a.num_tokens - 1 and b.num_computed_tokens == 3 + 2 == b.num_tokens - 1
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 100 - 5
