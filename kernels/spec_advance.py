"""The glue between two device-resident greedy speculative rounds, in one launch.

A round (engine/spec_decode/rounds.py) leaves on the device: the target's verify logits over its
pseudo-rows (sequence i's k + 1 rows at i * (k + 1) .., row j at position L_i - 1 + j, its input
ids [last token, d_0 .. d_{k-1}]), and the drafter's decode inputs (rows [0, b): each sequence's
newest token; rows [b, 2b): the token before it, fed again so that the drafter's K/V never lags;
``b`` = the drafter's row count). Per sequence this kernel:

- takes the argmax a_j of each verify row (torch.argmax's answer: the first index of the maximum),
- counts the leading matches n of the drafts with it (d_j == a_j for j < n),
- appends the n + 1 emitted tokens a_0 .. a_n to its row of ``out`` [b, W] after ``stats[i, 0]``
  tokens already there, adds n + 1 to stats[i, 0], writes n + 1 at stats[i, 2 + r] for round
  r = stats[i, 1] and counts the round in stats[i, 1],
- rewrites the target's pseudo-rows for the next round from the new length L' = L + n + 1 (row j:
  position L' - 1 + j, context length L' - 1 + j + 1, slot from the block table; row 0's id a_n;
  the other ids are the next round's drafts, copied in after the drafter ran), and the drafter's
  two rows (a_n at L' - 1, the token before it at L' - 2, both starting at L' - 2).

Sequences whose first target row has slot < 0 are padding of a graph bucket: nothing is written.
Every block-table lookup is clamped to the table, so the inputs computed after the last round (never
run) read nothing out of bounds. In torch this is some thirty small launches per round.
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton
from kernels.greedy_advance import MAX_BLOCK_V

def _slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    idx = (pos // block_size).clamp(0, tables.shape[1] - 1)
    return tables.gather(1, idx.unsqueeze(1)).squeeze(1).to(torch.int64) * block_size + pos % block_size


def spec_advance_ref(
    logits: torch.Tensor, t_ids: torch.Tensor, t_pos: torch.Tensor, t_lens: torch.Tensor, t_slots: torch.Tensor,
    t_start: torch.Tensor, t_tables: torch.Tensor, d_ids: torch.Tensor, d_pos: torch.Tensor, d_lens: torch.Tensor,
    d_slots: torch.Tensor, d_start: torch.Tensor, d_tables: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
    k: int, block_size: int,
) -> None:
    """In place on the target's [b * (k + 1)] and the drafter's [2b] decode inputs, out [b, W] and
    stats [b, 2 + R] (int32: emitted so far, rounds so far, emitted per round)."""
    b = out.shape[0]
    q = k + 1
    rows = b * q
    argmax = logits[:rows].argmax(dim=-1).view(b, q)
    ids = t_ids[:rows].view(b, q)
    live = t_slots[:rows].view(b, q)[:, 0] >= 0
    match = (ids[:, 1:] == argmax[:, :k]).to(torch.int64)
    n = match.cumprod(dim=1).sum(dim=1)  # leading matches
    emitted = n + 1
    seq = torch.arange(b, device=out.device)
    last = argmax[seq, n]
    prev = torch.where(n == 0, ids[:, 0], argmax[seq, (n - 1).clamp(min=0)])
    count = stats[:, 0].to(torch.int64)
    j = torch.arange(q, device=out.device)
    col = count[:, None] + j[None, :]
    keep = live[:, None] & (j[None, :] <= n[:, None]) & (col < out.shape[1])
    out[seq[:, None].expand(b, q)[keep], col[keep]] = argmax[keep]
    rnd = stats[:, 1].to(torch.int64)
    round_ok = live & (rnd < stats.shape[1] - 2)
    stats[seq[round_ok], 2 + rnd[round_ok]] = emitted[round_ok].to(stats.dtype)
    stats[:, 0] += torch.where(live, emitted, 0).to(stats.dtype)
    stats[:, 1] += live.to(stats.dtype)

    length = t_pos[:rows].view(b, q)[:, 0] + 1 + emitted  # L'
    pos = (length - 1)[:, None] + j[None, :]
    live_rows = live[:, None].expand(b, q).reshape(-1)
    flat_pos = pos.reshape(-1)
    slots = _slots(t_tables[:rows], flat_pos, block_size)
    t_pos[:rows] = torch.where(live_rows, flat_pos, t_pos[:rows])
    t_start[:rows] = torch.where(live_rows, (length - 1)[:, None].expand(b, q).reshape(-1), t_start[:rows])
    t_lens[:rows] = torch.where(live_rows, (flat_pos + 1).to(t_lens.dtype), t_lens[:rows])
    t_slots[:rows] = torch.where(live_rows, slots, t_slots[:rows])
    first = seq * q
    t_ids[first] = torch.where(live, last, t_ids[first])

    for off, token, p in ((0, last, length - 1), (b, prev, length - 2)):
        r = seq + off
        d_ids[r] = torch.where(live, token, d_ids[r])
        d_pos[r] = torch.where(live, p, d_pos[r])
        d_lens[r] = torch.where(live, (p + 1).to(d_lens.dtype), d_lens[r])
        d_start[r] = torch.where(live, length - 2, d_start[r])
        d_slots[r] = torch.where(live, _slots(d_tables[r], p, block_size), d_slots[r])


if HAS_TRITON:
    from kernels.greedy_advance import row_argmax

    @triton.jit
    def _slot(tables_ptr, row, table_stride, max_blocks, pos, BLOCK_SIZE: tl.constexpr):
        block_idx = tl.minimum(pos // BLOCK_SIZE, max_blocks - 1)
        block = tl.load(tables_ptr + row * table_stride + block_idx).to(tl.int64)
        return block * BLOCK_SIZE + pos % BLOCK_SIZE

    @triton.jit
    def _spec_advance_kernel(
        logits_ptr, logits_stride,
        t_ids_ptr, t_pos_ptr, t_lens_ptr, t_slots_ptr, t_start_ptr, t_tables_ptr, t_table_stride, t_max_blocks,
        d_ids_ptr, d_pos_ptr, d_lens_ptr, d_slots_ptr, d_start_ptr, d_tables_ptr, d_table_stride, d_max_blocks,
        out_ptr, out_stride, out_width, stats_ptr, stats_stride, max_rounds, b, vocab,
        K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        row0 = seq * (K + 1)
        live = tl.load(t_slots_ptr + row0) >= 0
        last = tl.load(t_ids_ptr + row0)  # the token at L - 1
        prev = last
        run = live
        count = tl.load(stats_ptr + seq * stats_stride)
        emitted = count * 0
        for j in tl.static_range(K + 1):
            a = row_argmax(logits_ptr + (row0 + j).to(tl.int64) * logits_stride, vocab, BLOCK_V)
            # a_j is emitted while every draft before it matched.
            prev = tl.where(run, last, prev)
            last = tl.where(run, a, last)
            col = count + emitted
            tl.store(out_ptr + seq * out_stride + col, a, mask=run & (col < out_width))
            emitted += run.to(tl.int32)
            if j < K:
                run = run & (tl.load(t_ids_ptr + row0 + j + 1) == a)

        rnd = tl.load(stats_ptr + seq * stats_stride + 1)
        tl.store(stats_ptr + seq * stats_stride + 2 + rnd, emitted, mask=live & (rnd < max_rounds))
        tl.store(stats_ptr + seq * stats_stride, count + emitted, mask=live)
        tl.store(stats_ptr + seq * stats_stride + 1, rnd + 1, mask=live)

        length = tl.load(t_pos_ptr + row0) + 1 + emitted.to(tl.int64)  # L'
        for j in tl.static_range(K + 1):
            row = row0 + j
            pos = length - 1 + j
            tl.store(t_pos_ptr + row, pos, mask=live)
            tl.store(t_start_ptr + row, length - 1, mask=live)
            tl.store(t_lens_ptr + row, (pos + 1).to(tl.int32), mask=live)
            slot = _slot(t_tables_ptr, row, t_table_stride, t_max_blocks, pos, BLOCK_SIZE)
            tl.store(t_slots_ptr + row, slot, mask=live)
        tl.store(t_ids_ptr + row0, last, mask=live)

        for side in tl.static_range(2):  # 0: the newest token's row, 1: the one before it
            row = seq + side * b
            pos = length - 1 - side
            tl.store(d_ids_ptr + row, tl.where(side == 0, last, prev), mask=live)
            tl.store(d_pos_ptr + row, pos, mask=live)
            tl.store(d_lens_ptr + row, (pos + 1).to(tl.int32), mask=live)
            tl.store(d_start_ptr + row, length - 2, mask=live)
            slot = _slot(d_tables_ptr, row, d_table_stride, d_max_blocks, pos, BLOCK_SIZE)
            tl.store(d_slots_ptr + row, slot, mask=live)


def spec_advance(
    logits: torch.Tensor, t_ids: torch.Tensor, t_pos: torch.Tensor, t_lens: torch.Tensor, t_slots: torch.Tensor,
    t_start: torch.Tensor, t_tables: torch.Tensor, d_ids: torch.Tensor, d_pos: torch.Tensor, d_lens: torch.Tensor,
    d_slots: torch.Tensor, d_start: torch.Tensor, d_tables: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
    k: int, block_size: int,
) -> None:
    """Triton version of spec_advance_ref: logits [>= b (k + 1), vocab] (any float dtype); ids,
    positions, slots, starts int64 and context lens int32, [b (k + 1)] for the target and [2b] for
    the drafter; block tables int32 (rows as the inputs'); out [b, W] int64, stats [b, 2 + R] int32."""
    b = out.shape[0]
    vocab = logits.shape[1]
    assert logits.stride(1) == 1 and t_tables.stride(1) == 1 and d_tables.stride(1) == 1
    assert out.stride(1) == 1 and stats.stride(1) == 1 and stats.dtype == torch.int32
    assert t_ids.dtype == t_pos.dtype == t_slots.dtype == d_ids.dtype == d_slots.dtype == torch.int64
    assert t_ids.shape[0] >= b * (k + 1) and d_ids.shape[0] >= 2 * b
    block_v = min(MAX_BLOCK_V, next_pow2(vocab))
    _spec_advance_kernel[(b,)](
        logits, logits.stride(0),
        t_ids, t_pos, t_lens, t_slots, t_start, t_tables, t_tables.stride(0), t_tables.shape[1],
        d_ids, d_pos, d_lens, d_slots, d_start, d_tables, d_tables.stride(0), d_tables.shape[1],
        out, out.stride(0), out.shape[1], stats, stats.stride(0), stats.shape[1] - 2, b, vocab,
        K=k, BLOCK_V=block_v, BLOCK_SIZE=block_size, num_warps=16 if block_v >= 4096 else 4,
    )
