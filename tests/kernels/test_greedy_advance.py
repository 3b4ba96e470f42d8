"""The multi-step greedy advance kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.greedy_advance import greedy_advance, greedy_advance_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows, vocab, block_size, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    # Ties at the maximum: the first index must win, as torch.argmax's does.
    logits[0, vocab // 3] = logits[0, vocab - 2] = logits[0].max() + 1.0
    if rows > 1:
        logits[1, 5] = logits[1, 4097 % vocab] = logits[1].max() + 2.0  # tie across argmax chunks
    width = 6
    tables = torch.randperm(rows * width + 8, generator=g)[: rows * width].view(rows, width).to(torch.int32)
    lens = torch.randint(1, block_size * (width - 2), (rows,), generator=g).to(torch.int32)
    lens[0] = block_size  # the next token opens a new block
    pos = (lens - 1).long()
    slots = tables.gather(1, (pos // block_size).unsqueeze(1)).squeeze(1).long() * block_size + pos % block_size
    slots[rows - 1] = -1  # a padding row
    start = pos - torch.randint(0, 3, (rows,), generator=g).clamp(max=pos)  # this is step 0, 1 or 2
    ids = torch.randint(0, vocab, (rows,), generator=g)
    tokens = torch.full((4, rows), -1, dtype=torch.int64)
    state = [logits.to(dtype), ids, pos, lens, slots, tables, start, tokens]
    return [t.to(device) for t in state]


@pytest.mark.parametrize("rows,vocab", [(1, 50), (3, 5000), (5, 20000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(rows, vocab, dtype):
    want = _case(rows, vocab, 4, dtype, "cpu", seed=rows)
    got = _case(rows, vocab, 4, dtype, DEVICE, seed=rows)
    greedy_advance_ref(*want, block_size=4)
    greedy_advance(*got, block_size=4)
    names = ["logits", "ids", "positions", "context_lens", "slots", "block_tables", "start_pos", "tokens"]
    for name, a, b in zip(names, want, got):
        assert torch.equal(a, b.cpu()), name
    tokens = want[-1]
    assert (tokens >= 0).sum() == rows - 1  # one token per live row, none for the padding row


@pytest.mark.gpu
def test_matches_reference_gpu_engine_vocab():
    # SmolLM2's vocabulary, a CUDA-graph bucket of 16 with padding rows, bf16 logits.
    want = _case(16, 49152, 16, torch.bfloat16, "cpu", seed=3)
    got = _case(16, 49152, 16, torch.bfloat16, "cuda", seed=3)
    greedy_advance_ref(*want, block_size=16)
    greedy_advance(*got, block_size=16)
    for a, b in zip(want, got):
        assert torch.equal(a, b.cpu())
