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
