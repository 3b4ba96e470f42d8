"""The decode step's inputs, in one staging buffer: [ids | positions | slots | start positions]
(int64, one row each) then [context lens | block tables] (int32). The start positions (a
multi-step batch's first positions) say which step a token belongs to. The device views are what
the eager decode and the decode CUDA graphs read; between two forwards of a multi-step decode the
greedy advance rewrites them on the device (kernels/greedy_advance.py).

The same rows also carry a chunk forward as pseudo-rows (``prepare_chunks``): a speculative verify
of k + 1 tokens per sequence, or a draft's catch-up, becomes k + 1 decode rows that share the
sequence's block table, row j at position start + j with context length start + j + 1. Every row's
K/V is stored before any row attends, so paged decode attention over these rows is causal by
construction (with programmatic dependent launch the attention starts before that store ends: it
reads each row's positions from ``start``, its chunk's first, only after waiting for it), and the
decode path (its fused small-batch matmuls, which read the weights once for all rows, and its CUDA
graphs) runs the forward without a kernel of its own."""

from __future__ import annotations

import numpy as np
import torch

from engine.context import Context
from engine.sequence import Sequence
from engine.staging import StagingBuffer
from kernels.greedy_advance import greedy_advance, greedy_advance_ref


class DecodeInputs:
    def __init__(self, device: torch.device, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 num_steps: int, use_triton: bool) -> None:
        self.block_size, self.width, self.use_triton = block_size, max_blocks_per_seq, use_triton
        i64, i32 = torch.int64, torch.int32
        self.buf = StagingBuffer(device, {
            "ids": (i64, (max_seqs,)), "pos": (i64, (max_seqs,)), "slots": (i64, (max_seqs,)),
            "start": (i64, (max_seqs,)), "lens": (i32, (max_seqs,)), "tables": (i32, (max_seqs, max_blocks_per_seq)),
        }, banks=2)  # bank 1: pseudo-rows, staged in the same round as a decode (a draft's catch-up)
        self.h, self.d = self.buf.host, self.buf.dev
        # Padding rows of a graph bucket: store nothing (slot -1), attend to one token.
        self.h.slots[:] = -1
        self.h.lens[:] = 1
        self.buf.copy_to_device()
        self.buf.banks[1].slots[:] = -1
        self.buf.banks[1].lens[:] = 1
        # Block tables are rewritten only where they changed: row i remembers whose table it holds,
        # how many entries are written and the last one. Decode appends blocks, and a step that
        # keeps fewer tokens than it reserved gives its tail back (BlockManager.release_unused), so
        # a table may shrink and regrow to its old length with another last block between two
        # prepares; a table replaced (preemption, then re-admission) passes through a prefill step,
        # which forgets all rows.
        self._row_seq = [-1] * max_seqs
        self._row_blocks = [0] * max_seqs
        self._row_last = [-1] * max_seqs
        self._rows = np.arange(max_seqs)
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, Context]] = {}
        # Multi-step decode: step k's tokens are row k of a [steps, rows] view of d_tokens; one
        # copy to the (pinned) host buffer brings them all back.
        n_tok = num_steps * max_seqs
        self.d_tokens = torch.zeros(n_tok, dtype=i64, device=device)
        self.h_tokens = torch.zeros(n_tok, dtype=i64, pin_memory=True) if device.type == "cuda" else self.d_tokens

    def forget_rows(self) -> None:
        self._row_seq = [-1] * len(self._row_seq)

    def prepare(self, seqs: list[Sequence], rows: int) -> None:
        """Fill the staging buffer for ``seqs`` (padded to ``rows``) and start its copy."""
        n = len(seqs)
        bs = self.block_size
        h = self.buf.writable(0)
        tables, row_seq, row_blocks, row_last = h.tables, self._row_seq, self._row_blocks, self._row_last
        # The rows whose table changed since the last step (most rows of most steps keep theirs).
        changed = [i for i, seq, sid, done, last in zip(range(n), seqs, row_seq, row_blocks, row_last)
                   if done != len(seq.block_table) or sid != seq.seq_id or last != seq.block_table[-1]]
        for i in changed:
            seq = seqs[i]
            table = seq.block_table
            nb, done = len(table), row_blocks[i]
            if row_seq[i] != seq.seq_id or done >= nb:
                tables[i, :nb] = table
                row_seq[i], row_blocks[i], row_last[i] = seq.seq_id, nb, table[-1]
            else:  # new blocks since the last step
                if done and row_last[i] != table[done - 1]:  # the tail was given back and regrown
                    done = 0
                tables[i, done:nb] = table[done:]
                row_blocks[i], row_last[i] = nb, table[-1]
        h.ids[:n] = [seq.token_ids[-1] for seq in seqs]
        h.lens[:n] = [len(seq.token_ids) for seq in seqs]
        pos = h.pos[:n]
        pos[:] = h.lens[:n] - 1
        h.start[:n] = pos
        # Each row's slot from the table it now holds: the block of its last token's position.
        h.slots[:n] = tables[self._rows[:n], pos // bs].astype(np.int64) * bs + pos % bs
        if rows > n:
            h.slots[n:rows] = -1
            h.lens[n:rows] = 1
        # Only the prefix the step reads: the int64 rows, the lens, then `rows` table rows.
        self.buf.copy_to_device(self.buf.offsets["tables"] + 4 * rows * self.width)

    def prepare_chunks(self, chunks: list[tuple[list[int], int, list[int]]], rows: int,
                       ids: torch.Tensor | None = None) -> None:
        """Stage each (token_ids, start, block_table) chunk as pseudo-rows, in order (padded to
        ``rows``), from host bank 1, and start the copy. The rows' remembered tables are forgotten.
        ``ids``: the chunks' tokens already on the device, copied in after the staged ones."""
        h, bs = self.buf.writable(1), self.block_size
        staged: list[int] = []  # the chunks' tokens, one per row
        positions: list[int] = []
        firsts: list[int] = []  # each row's chunk start: what this forward stores of its sequence
        slots: list[int] = []
        for tokens, start, table in chunks:
            end = start + len(tokens)
            h.tables[len(staged) : len(staged) + len(tokens), : len(table)] = table  # each row: its sequence's table
            staged.extend(tokens)
            positions.extend(range(start, end))
            firsts.extend([start] * len(tokens))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        row = len(staged)
        h.ids[:row] = staged
        h.pos[:row] = positions
        h.start[:row] = firsts
        h.lens[:row] = h.pos[:row] + 1
        h.slots[:row] = slots
        h.slots[row:rows] = -1
        h.lens[row:rows] = 1
        self.buf.copy_to_device(self.buf.offsets["tables"] + 4 * rows * self.width, bank=1)
        if ids is not None:
            self.d.ids[:row].copy_(ids)
        self._row_seq[:rows] = [-1] * rows

    def prepare_lagged(self, seqs: list[Sequence], rows: int) -> None:
        """Stage a drafter's first forward of a speculative round (engine/spec_decode/rounds.py) and
        start its copy: rows [0, rows) each sequence's last token at len - 1, rows [rows, 2 rows) the
        token before it at len - 2 (its K/V written again: the drafter never lags by a token), every
        row starting at len - 2; padding rows (n.. of each half) store nothing. The rows' remembered
        tables are forgotten."""
        n, bs = len(seqs), self.block_size
        h = self.buf.writable(0)
        for half in (rows, 0):  # the lag rows first: their positions are every row's start
            for i, seq in enumerate(seqs):
                table, pos = seq.block_table, len(seq.token_ids) - 1 - (half > 0)
                h.tables[half + i, : len(table)] = table
                h.ids[half + i] = seq.token_ids[pos]
                h.pos[half + i] = pos
                h.slots[half + i] = table[pos // bs] * bs + pos % bs
            h.start[half : half + n] = h.pos[rows : rows + n] if half == 0 else h.pos[half : half + n]
            h.lens[half : half + n] = h.pos[half : half + n] + 1
            h.slots[half + n : half + rows] = -1
            h.lens[half + n : half + rows] = 1
        self.buf.copy_to_device(self.buf.offsets["tables"] + 4 * 2 * rows * self.width)
        self._row_seq[: 2 * rows] = [-1] * (2 * rows)

    def views(self, rows: int, verify_query_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """(ids, positions, attention context) of a decode over the first ``rows`` rows; made once
        per size. They point into the static buffers, so they stay valid from step to step.
        ``verify_query_len``: the rows are pseudo-rows of sequences of that many tokens each, whose
        attention reads each sequence's K/V once (Context.verify_query_len)."""
        views = self._views.get((rows, verify_query_len))
        if views is None:
            d = self.d
            ctx = Context(is_prefill=False, slot_mapping=d.slots[:rows], context_lens=d.lens[:rows],
                          block_tables=d.tables[:rows], verify_query_len=verify_query_len, first_new=d.start[:rows])
            views = self._views[rows, verify_query_len] = (d.ids[:rows], d.pos[:rows], ctx)
        return views

    def advance(self, logits: torch.Tensor, rows: int, out: torch.Tensor) -> None:
        """Greedy tokens of this step into out [steps, rows]; the decode inputs of rows [0, rows)
        become the next step's (kernels/greedy_advance.py)."""
        d = self.d
        fn = greedy_advance if self.use_triton else greedy_advance_ref
        fn(logits, d.ids[:rows], d.pos[:rows], d.lens[:rows], d.slots[:rows], d.tables[:rows], d.start[:rows], out,
           self.block_size)

    def warm_advance(self, logits: torch.Tensor, rows: int, out: torch.Tensor) -> None:
        """``advance`` once outside any graph, the buffers it writes restored after: its kernel is
        compiled and loaded before a graph records it (a kernel's first launch inside a capture
        loads its module there, which invalidates the capture)."""
        d = self.d
        written = (d.ids, d.pos, d.lens, d.slots, out)
        saved = [t.clone() for t in written]
        self.advance(logits, rows, out)
        for t, s in zip(written, saved):
            t.copy_(s)

    def advance_to(self, tokens: torch.Tensor, n: int, last_pos: torch.Tensor) -> None:
        """Make ``tokens`` [n] (on the device) the next decode inputs of rows [0, n), one position
        later, without a sync (a draft model's sampled tokens). A row whose position would pass
        ``last_pos`` [n] (the last position its blocks were reserved for) stays at it and stores
        nothing: its forward is wasted but harmless."""
        d = self.d
        pos, lens, slots = d.pos[:n], d.lens[:n], d.slots[:n]
        d.ids[:n].copy_(tokens)
        live = pos < last_pos
        pos.add_(live)
        lens.add_(live.to(lens.dtype))
        block_idx = (pos // self.block_size).clamp_(max=self.width - 1)
        block = d.tables[:n].gather(1, block_idx.unsqueeze(1)).squeeze(1).to(slots.dtype)
        slots.copy_(torch.where(live, block * self.block_size + pos % self.block_size, -1))

    def step_tokens(self, steps: int, rows: int) -> torch.Tensor:
        """The [steps, rows] device buffer of a multi-step decode's tokens."""
        return self.d_tokens[: steps * rows].view(steps, rows)

    def fetch_tokens(self, out: torch.Tensor) -> list[list[int]]:
        """[steps, n] device tokens -> per sequence, its tokens in step order; the one sync."""
        if out.device.type == "cuda":
            host = self.h_tokens[: out.numel()].view(out.shape)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(out.device.index).synchronize()  # by index: no device lookup
            out = host
        return out.t().tolist()
