"""The decode step's inputs, in one staging buffer: [ids | positions | slots | start positions]
(int64, one row each) then [context lens | block tables] (int32). The start positions (a
multi-step batch's first positions) say which step a token belongs to. The device views are what
the eager decode and the decode CUDA graphs read; between two forwards of a multi-step decode the
greedy advance rewrites them on the device (kernels/greedy_advance.py)."""

from __future__ import annotations

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
        })
        self.h, self.d = self.buf.host, self.buf.dev
        # Padding rows of a graph bucket: store nothing (slot -1), attend to one token.
        self.h.slots[:] = -1
        self.h.lens[:] = 1
        self.buf.copy_to_device()
        # Block tables are rewritten only where they changed: row i remembers whose table it holds
        # and how many entries are written. Decode only ever appends blocks; a table replaced
        # (preemption, then re-admission) always passes through a prefill step, which forgets all rows.
        self._row_seq = [-1] * max_seqs
        self._row_blocks = [0] * max_seqs
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, Context]] = {}
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
        h = self.h
        tables, row_seq, row_blocks = h.tables, self._row_seq, self._row_blocks
        ids: list[int] = []
        lens: list[int] = []
        slots: list[int] = []
        for i, seq in enumerate(seqs):
            length = len(seq.token_ids)
            table = seq.block_table
            ids.append(seq.token_ids[-1])
            lens.append(length)
            pos = length - 1
            slots.append(table[pos // bs] * bs + pos % bs)
            nb, done = len(table), row_blocks[i]
            if row_seq[i] != seq.seq_id or done > nb:
                tables[i, :nb] = table
                row_seq[i], row_blocks[i] = seq.seq_id, nb
            elif done < nb:  # a new block since the last step
                tables[i, done:nb] = table[done:]
                row_blocks[i] = nb
        h.ids[:n] = ids
        h.lens[:n] = lens
        h.pos[:n] = h.lens[:n] - 1
        h.start[:n] = h.pos[:n]
        h.slots[:n] = slots
        if rows > n:
            h.slots[n:rows] = -1
            h.lens[n:rows] = 1
        # Only the prefix the step reads: the int64 rows, the lens, then `rows` table rows.
        self.buf.copy_to_device(self.buf.offsets["tables"] + 4 * rows * self.width)

    def views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """(ids, positions, attention context) of a decode over the first ``rows`` rows; made once
        per size. They point into the static buffers, so they stay valid from step to step."""
        views = self._views.get(rows)
        if views is None:
            d = self.d
            ctx = Context(is_prefill=False, slot_mapping=d.slots[:rows], context_lens=d.lens[:rows],
                          block_tables=d.tables[:rows])
            views = self._views[rows] = (d.ids[:rows], d.pos[:rows], ctx)
        return views

    def advance(self, logits: torch.Tensor, rows: int, out: torch.Tensor) -> None:
        """Greedy tokens of this step into out [steps, rows]; the decode inputs of rows [0, rows)
        become the next step's (kernels/greedy_advance.py)."""
        d = self.d
        fn = greedy_advance if self.use_triton else greedy_advance_ref
        fn(logits, d.ids[:rows], d.pos[:rows], d.lens[:rows], d.slots[:rows], d.tables[:rows], d.start[:rows], out,
           self.block_size)

    def step_tokens(self, steps: int, rows: int) -> torch.Tensor:
        """The [steps, rows] device buffer of a multi-step decode's tokens."""
        return self.d_tokens[: steps * rows].view(steps, rows)

    def fetch_tokens(self, out: torch.Tensor) -> list[list[int]]:
        """[steps, n] device tokens -> per sequence, its tokens in step order; the one sync."""
        if out.device.type == "cuda":
            host = self.h_tokens[: out.numel()].view(out.shape)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            out = host
        return out.t().tolist()
