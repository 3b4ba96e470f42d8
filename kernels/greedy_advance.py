"""Multi-step greedy decode's glue between two forwards, in one launch.

For each row of a decode batch: the argmax of its logits (torch.argmax's answer: the first index
of the maximum) is the step's token; it is recorded in a [steps, rows] token buffer and becomes
the row's next input, one position later, with its K/V slot looked up in the block table. Rows
with slot < 0 are padding of a CUDA-graph bucket: they record nothing and stay as they are (their
stale positions never grow past the block table). In torch this is about a dozen launches (argmax,
adds, a gather, a where, copies); at batch 1 they cost more than the attention of a layer.

The step a token belongs to is its input position minus the row's position at the first step
(``start_pos``), so one captured graph serves every step of a multi-step batch.
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton

MAX_BLOCK_V = 8192  # logits per iteration of a row's argmax loop


def greedy_advance_ref(
    logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, context_lens: torch.Tensor,
    slots: torch.Tensor, block_tables: torch.Tensor, start_pos: torch.Tensor, tokens: torch.Tensor,
    block_size: int,
) -> None:
    """In place on ids, positions, context_lens, slots [rows] and tokens [steps, rows]."""
    rows = ids.shape[0]
    next_ids = logits[:rows].argmax(dim=-1)
    live = slots >= 0
    step = (positions - start_pos).clamp(0, tokens.shape[0] - 1)
    row_idx = torch.arange(rows, device=ids.device)
    tokens[step[live], row_idx[live]] = next_ids[live]
    ids.copy_(next_ids)
    positions.add_(live)
    context_lens.add_(live)
    # A padding row's stale position may point past its table: clamp the (unused) lookup.
    block_idx = (positions // block_size).clamp_(max=block_tables.shape[1] - 1)
    block = block_tables.gather(1, block_idx.unsqueeze(1)).squeeze(1).to(slots.dtype)
    slots.copy_(torch.where(live, block * block_size + positions % block_size, -1))


if HAS_TRITON:

    @triton.jit
    def row_argmax(base, vocab, BLOCK_V: tl.constexpr):
        """torch.argmax of the row at base (int64): the first index of its maximum, BLOCK_V at a time."""
        offs = tl.arange(0, BLOCK_V)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            x = tl.load(base + v0 + offs, mask=v0 + offs < vocab, other=float("-inf")).to(tl.float32)
            m, i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            take = m > best  # strict: an earlier chunk keeps a tie
            best_idx = tl.where(take, v0 + i, best_idx)
            best = tl.where(take, m, best)
        return best_idx.to(tl.int64)

    @triton.jit
    def _greedy_advance_kernel(
        logits_ptr, ids_ptr, pos_ptr, lens_ptr, slots_ptr, tables_ptr, start_ptr, tokens_ptr,
        logits_stride, table_stride, rows, vocab, max_blocks, steps,
        BLOCK_V: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0)
        token = row_argmax(logits_ptr + row.to(tl.int64) * logits_stride, vocab, BLOCK_V)
        slot = tl.load(slots_ptr + row)
        pos = tl.load(pos_ptr + row)
        live = slot >= 0
        step = tl.minimum(tl.maximum(pos - tl.load(start_ptr + row), 0), steps - 1)
        tl.store(tokens_ptr + step * rows + row, token, mask=live)
        tl.store(ids_ptr + row, token)
        new_pos = pos + live.to(pos.dtype)
        tl.store(pos_ptr + row, new_pos)
        tl.store(lens_ptr + row, tl.load(lens_ptr + row) + live.to(tl.int32))
        block_idx = tl.minimum(new_pos // BLOCK_SIZE, max_blocks - 1)
        block = tl.load(tables_ptr + row * table_stride + block_idx).to(tl.int64)
        tl.store(slots_ptr + row, tl.where(live, block * BLOCK_SIZE + new_pos % BLOCK_SIZE, -1))


def greedy_advance(
    logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, context_lens: torch.Tensor,
    slots: torch.Tensor, block_tables: torch.Tensor, start_pos: torch.Tensor, tokens: torch.Tensor,
    block_size: int,
) -> None:
    """Triton version of greedy_advance_ref: logits [>= rows, vocab] (any float dtype), ids,
    positions, slots, start_pos [rows] int64, context_lens [rows] int32, block_tables [rows, W]
    int32, tokens [steps, rows] int64 (contiguous)."""
    rows = ids.shape[0]
    vocab = logits.shape[1]
    assert logits.stride(1) == 1 and block_tables.stride(1) == 1 and tokens.is_contiguous()
    assert tokens.shape[1] == rows and ids.dtype == positions.dtype == slots.dtype == torch.int64
    block_v = min(MAX_BLOCK_V, next_pow2(vocab))
    _greedy_advance_kernel[(rows,)](
        logits, ids, positions, context_lens, slots, block_tables, start_pos, tokens,
        logits.stride(0), block_tables.stride(0), rows, vocab, block_tables.shape[1], tokens.shape[0],
        BLOCK_V=block_v, BLOCK_SIZE=block_size, num_warps=16 if block_v >= 4096 else 4,
    )
