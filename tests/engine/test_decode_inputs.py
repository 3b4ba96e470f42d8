"""DecodeInputs keeps each row's block table in step with its sequence's, including a tail that a
speculative step gave back (BlockManager.release_unused) and the next step regrew with other blocks."""

from __future__ import annotations

import torch

from engine.decode_inputs import DecodeInputs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def _inputs() -> DecodeInputs:
    return DecodeInputs(torch.device("cpu"), max_seqs=2, max_blocks_per_seq=8, block_size=4, num_steps=1,
                        use_triton=False)


def _row(inputs: DecodeInputs, i: int, n: int) -> list[int]:
    return inputs.h.tables[i, :n].tolist()


def test_a_tail_given_back_and_regrown_between_two_steps_is_rewritten():
    inputs = _inputs()
    seq = Sequence(list(range(9)), SamplingParams())
    seq.block_table = [3, 4, 5]
    inputs.prepare([seq], 1)
    seq.block_table = [3, 4, 7]  # same length, another last block
    inputs.prepare([seq], 1)
    assert _row(inputs, 0, 3) == [3, 4, 7]
    assert inputs.h.slots[0].item() == 7 * 4 + 0  # position 8 is in block 2
    seq.block_table = [3, 9, 10, 11]  # two blocks given back, three taken
    inputs.prepare([seq], 1)
    assert _row(inputs, 0, 4) == [3, 9, 10, 11]


def test_appended_blocks_are_written():
    inputs = _inputs()
    seq = Sequence(list(range(5)), SamplingParams())
    seq.block_table = [1, 2]
    inputs.prepare([seq], 1)
    seq.block_table = [1, 2, 6, 8]
    inputs.prepare([seq], 1)
    assert _row(inputs, 0, 4) == [1, 2, 6, 8]


def test_advance_to_feeds_tokens_and_stops_at_each_rows_last_position():
    inputs = _inputs()
    a, b = Sequence(list(range(6)), SamplingParams()), Sequence(list(range(3)), SamplingParams())
    a.block_table, b.block_table = [1, 2, 3], [4, 5]
    inputs.prepare([a, b], 2)
    last = torch.tensor([6, 2])  # a may write position 6; b only its last token's, 2
    inputs.advance_to(torch.tensor([40, 41]), 2, last)
    d = inputs.d
    assert d.ids[:2].tolist() == [40, 41]
    assert d.pos[:2].tolist() == [6, 2] and d.lens[:2].tolist() == [7, 3]
    assert d.slots[:2].tolist() == [2 * 4 + 2, -1]  # b stores nothing
    inputs.advance_to(torch.tensor([50, 51]), 2, last)
    assert d.pos[:2].tolist() == [6, 2] and d.slots[:2].tolist() == [-1, -1]


def test_chunks_stage_one_row_per_token_and_forget_the_remembered_tables():
    """prepare_chunks: row j of a chunk at start s sits at position s + j, stores its K/V at that
    position's slot (here across a block boundary) and attends to s + j + 1 tokens; padding rows
    store nothing. The next plain prepare rewrites the tables the chunks overwrote."""
    inputs = DecodeInputs(torch.device("cpu"), max_seqs=8, max_blocks_per_seq=8, block_size=4, num_steps=1,
                          use_triton=False)
    seq = Sequence(list(range(6)), SamplingParams())
    seq.block_table = [9, 8]
    inputs.prepare([seq], 1)
    inputs.prepare_chunks([([5, 6, 7], 3, [1, 2]), ([8, 9], 0, [4])], 8)
    d = inputs.d
    assert d.ids[:5].tolist() == [5, 6, 7, 8, 9]
    assert d.pos[:5].tolist() == [3, 4, 5, 0, 1]
    assert d.lens[:8].tolist() == [4, 5, 6, 1, 2, 1, 1, 1]
    assert d.slots[:8].tolist() == [1 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 4 * 4 + 0, 4 * 4 + 1, -1, -1, -1]
    assert d.tables[:3, :2].tolist() == [[1, 2]] * 3 and d.tables[3:5, 0].tolist() == [4, 4]
    # Each row's first position this forward stores of its sequence (its chunk's start): the decode
    # attention reads from there on only after the store (PDL; issue 17), not only its newest.
    assert d.start[:5].tolist() == [3, 3, 3, 0, 0]
    _, _, ctx = inputs.views(8)
    assert ctx.first_new.data_ptr() == d.start.data_ptr() and ctx.first_new.shape == (8,)
    inputs.prepare([seq], 1)  # the same sequence as before the chunks: its table is written again
    assert _row(inputs, 0, 2) == [9, 8] and d.tables[0, :2].tolist() == [9, 8]
    assert d.slots[0].item() == 8 * 4 + 1
    assert d.start[0].item() == 5  # a decode row: its newest position


def test_warm_advance_runs_the_advance_and_leaves_the_buffers_as_they_were():
    """DecodeGraphs.capture warms the multi-step greedy advance with it before recording the step
    graph (a kernel first launched inside a capture invalidates it: the H200 run of 2026-11-29)."""
    inputs = DecodeInputs(torch.device("cpu"), max_seqs=2, max_blocks_per_seq=8, block_size=4, num_steps=3,
                          use_triton=False)
    seqs = [Sequence(list(range(n)), SamplingParams()) for n in (5, 9)]
    for s, table in zip(seqs, ([1, 2], [3, 4, 5])):
        s.block_table = table
    inputs.prepare(seqs, 2)
    logits = torch.randn(2, 11)
    out = inputs.step_tokens(3, 2)
    before = [t.clone() for t in (inputs.d.ids, inputs.d.pos, inputs.d.lens, inputs.d.slots, out)]
    inputs.warm_advance(logits, 2, out)
    assert all(torch.equal(a, b) for a, b in zip(before, (inputs.d.ids, inputs.d.pos, inputs.d.lens, inputs.d.slots, out)))
    inputs.advance(logits, 2, out)  # what it ran: the real advance moves every row on
    assert inputs.d.ids[:2].tolist() == logits.argmax(-1).tolist() and inputs.d.pos[:2].tolist() == [5, 9]


def test_every_rows_slot_comes_from_its_current_table():
    """Rows whose tables stay, grow, or change hands (another sequence in the row) each store their
    last token's K/V at the slot of their own table's block for its position."""
    inputs = DecodeInputs(torch.device("cpu"), max_seqs=4, max_blocks_per_seq=8, block_size=4, num_steps=1,
                          use_triton=False)
    seqs = [Sequence(list(range(n)), SamplingParams()) for n in (3, 8, 9, 13)]
    for k, s in enumerate(seqs):
        s.block_table = [10 * k + j for j in range((s.num_tokens + 3) // 4)]

    def check(batch):
        inputs.prepare(batch, 4)
        want = [s.block_table[(s.num_tokens - 1) // 4] * 4 + (s.num_tokens - 1) % 4 for s in batch]
        assert inputs.h.slots[: len(batch)].tolist() == want
        assert inputs.h.ids[: len(batch)].tolist() == [s.token_ids[-1] for s in batch]
        assert inputs.h.lens[: len(batch)].tolist() == [s.num_tokens for s in batch]

    check(seqs)
    for s in seqs:  # one more token each: rows 1 and 3 (8 and 12 tokens full) take a new block
        s.append_token(1)
        if s.num_tokens > 4 * len(s.block_table):
            s.block_table.append(90 + s.seq_id % 10)
    check(seqs)
    check([seqs[2], seqs[0], seqs[3]])  # other sequences in rows 0 and 1; row 3 is padding
