"""The device-resident speculative round's advance kernel against its torch reference: ragged
acceptance (none, some, all), a padding sequence, a new length across a block boundary, a second
round appending after the first's tokens, ties at the maximum."""

from __future__ import annotations

import pytest
import torch

from kernels.spec_advance import spec_advance, spec_advance_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["logits", "t_ids", "t_pos", "t_lens", "t_slots", "t_start", "t_tables", "d_ids", "d_pos", "d_lens",
         "d_slots", "d_start", "d_tables", "out", "stats"]


def _slot(table: torch.Tensor, pos: int, bs: int) -> int:
    return int(table[pos // bs]) * bs + pos % bs


def _case(b, k, vocab, bs, accept, dtype, seed):
    """b sequences (the last one padding), sequence i accepting accept[i] drafts."""
    g = torch.Generator().manual_seed(seed)
    q, width = k + 1, 8
    logits = torch.randn(b * q, vocab, generator=g)
    logits[0, vocab // 3] = logits[0, vocab - 2] = logits[0].max() + 1.0  # a tie: the first index wins
    argmax = logits.argmax(-1).view(b, q)
    tables = torch.randperm(b * width + 8, generator=g)[: b * width].view(b, width).to(torch.int32)
    lengths = torch.randint(2, bs * (width - 4), (b,), generator=g)
    lengths[0] = 2 * bs  # L' - 1 = 2bs + n: the drafter's lag row and the target's rows cross a block
    t_ids = torch.randint(0, vocab, (b, q), generator=g)
    for i, n in enumerate(accept):
        t_ids[i, 1 : n + 1] = argmax[i, :n]
        if n < k:  # a draft that differs from the target's token
            t_ids[i, n + 1] = (argmax[i, n] + 1 + torch.randint(0, vocab - 1, (), generator=g)) % vocab
    t_pos = (lengths - 1)[:, None] + torch.arange(q)[None, :]
    t_tables = tables.repeat_interleave(q, dim=0)
    t_slots = torch.tensor([_slot(t_tables[r], int(p), bs) for r, p in enumerate(t_pos.reshape(-1))])
    t_slots.view(b, q)[-1] = -1  # the padding sequence
    t_lens = (t_pos + 1).to(torch.int32).reshape(-1)
    t_start = (lengths - 1)[:, None].expand(b, q).reshape(-1).clone()
    d_rows = 2 * b
    d_ids = torch.randint(0, vocab, (d_rows,), generator=g)
    d_pos = torch.randint(0, 50, (d_rows,), generator=g)
    d_lens = (d_pos + 1).to(torch.int32)
    d_slots = torch.randint(0, 100, (d_rows,), generator=g)
    d_slots[b - 1] = d_slots[2 * b - 1] = -1
    d_start = d_pos.clone()
    d_tables = torch.cat([tables, tables])
    rounds = 3
    out = torch.full((b, rounds * q), -1, dtype=torch.int64)
    stats = torch.zeros(b, 2 + rounds, dtype=torch.int32)
    stats[:, 0] = torch.randint(0, q, (b,), generator=g).to(torch.int32)  # a round already ran
    stats[:, 1] = 1
    state = [logits.to(dtype), t_ids.reshape(-1), t_pos.reshape(-1), t_lens, t_slots, t_start, t_tables, d_ids,
             d_pos, d_lens, d_slots, d_start, d_tables, out, stats]
    return state, argmax, lengths


@pytest.mark.parametrize("k,vocab,accept", [(1, 50, (0, 1, 0)), (4, 5000, (2, 0, 4, 3, 1)),
                                            (3, 20000, (3, 1, 0, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(k, vocab, accept, dtype):
    b, bs = len(accept), 4
    want, argmax, lengths = _case(b, k, vocab, bs, accept, dtype, seed=k)
    got = [t.to(DEVICE) for t in _case(b, k, vocab, bs, accept, dtype, seed=k)[0]]
    before = [t.clone() for t in want]
    spec_advance_ref(*want, k=k, block_size=bs)
    spec_advance(*got, k=k, block_size=bs)
    for name, a, c in zip(NAMES, want, got):
        assert torch.equal(a, c.cpu()), name
    # What the reference did, checked by hand: the emitted tokens, the counts and the new inputs.
    _, t_ids, t_pos, t_lens, t_slots, t_start, t_tables, d_ids, d_pos, _, d_slots, d_start, d_tables, out, stats = want
    argmax = before[0].float().argmax(-1).view(b, k + 1)  # bf16 rounding may move the argmax: re-take it
    q = k + 1
    for i in range(b - 1):
        n = accept[i] if dtype == torch.float32 else int(
            (before[1].view(b, q)[i, 1:] == argmax[i, :k]).int().cumprod(0).sum())
        c0 = int(before[-1][i, 0])
        assert out[i, c0 : c0 + n + 1].tolist() == argmax[i, : n + 1].tolist()
        assert (out[i, :c0] == -1).all() and (out[i, c0 + n + 1 :] == -1).all()
        assert stats[i].tolist()[:3] == [c0 + n + 1, 2, 0] and int(stats[i, 3]) == n + 1
        new_len = int(lengths[i]) + n + 1
        rows = slice(i * q, (i + 1) * q)
        assert t_pos[rows].tolist() == list(range(new_len - 1, new_len - 1 + q))
        assert (t_start[rows] == new_len - 1).all() and t_lens[rows].tolist() == list(range(new_len, new_len + q))
        assert t_slots[rows].tolist() == [_slot(t_tables[i * q], p, bs) for p in range(new_len - 1, new_len - 1 + q)]
        assert int(t_ids[i * q]) == int(argmax[i, n])
        assert t_ids[i * q + 1 : (i + 1) * q].tolist() == before[1][i * q + 1 : (i + 1) * q].tolist()
        prev = int(before[1][i * q]) if n == 0 else int(argmax[i, n - 1])
        assert [int(d_ids[i]), int(d_ids[b + i])] == [int(argmax[i, n]), prev]
        assert [int(d_pos[i]), int(d_pos[b + i])] == [new_len - 1, new_len - 2]
        assert int(d_start[i]) == int(d_start[b + i]) == new_len - 2
        assert [int(d_slots[i]), int(d_slots[b + i])] == [_slot(d_tables[i], new_len - 1, bs),
                                                          _slot(d_tables[i], new_len - 2, bs)]
    pad = b - 1  # the padding sequence: nothing written
    for name, a, c in zip(NAMES, want, before):
        if name.startswith("t_"):
            assert torch.equal(a.view(b, -1)[pad] if a.dim() == 1 else a[pad * q : (pad + 1) * q],
                               c.view(b, -1)[pad] if c.dim() == 1 else c[pad * q : (pad + 1) * q]), name
        elif name in ("d_ids", "d_pos", "d_lens", "d_slots", "d_start"):
            assert a[pad] == c[pad] and a[b + pad] == c[b + pad], name
        elif name in ("out", "stats"):
            assert torch.equal(a[pad], c[pad]), name


@pytest.mark.gpu
def test_matches_reference_gpu_engine_vocab():
    accept = (4, 0, 2, 1, 3, 4, 0, 2)
    want = _case(8, 4, 49152, 16, accept, torch.bfloat16, seed=9)[0]
    got = [t.cuda() for t in _case(8, 4, 49152, 16, accept, torch.bfloat16, seed=9)[0]]
    spec_advance_ref(*want, k=4, block_size=16)
    spec_advance(*got, k=4, block_size=16)
    for name, a, c in zip(NAMES, want, got):
        assert torch.equal(a, c.cpu()), name
