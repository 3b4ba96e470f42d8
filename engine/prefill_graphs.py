"""CUDA graphs for short prefill steps.

A prefill run eagerly costs the host a launch per kernel, about 9 per layer: some 20 ms for 16
tokens of SmolLM2-135M on an H100 host (experiments/prefill_host.py), while the GPU work takes well
under a millisecond. At small batches that is most of the time to the first token. So a prefill
step of at most ``max_seqs`` sequences and ``prefill_graph_max_tokens`` tokens replays a graph
captured for the next bucket: tokens 16, 32, ..., sequences 1 or ``max_seqs``. Padding tokens store
nothing in the cache (slot -1) and belong to no sequence's query, which the varlen attention kernel
reads from the cumulative query lengths; padding sequences have no query tokens, so their programs
return at once. The logits are taken at each sequence's last token. Everything the graph reads is
in one staging buffer, moved with one host-to-device copy per step, as the decode graphs do.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.context import Context, reset_context, set_context


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, block_size: int, max_blocks: int,
                 max_tokens: int, max_seqs: int) -> None:
        self.model, self.device, self.block_size, self.width = model, device, block_size, max_blocks
        self.token_buckets = [16 << i for i in range(16) if 16 << i <= max_tokens]
        self.seq_buckets = sorted({1, max(1, min(max_seqs, 16))})
        t, s = self.token_buckets[-1], self.seq_buckets[-1]
        # int64: ids, positions, slots [t]; last rows [s]. int32: cumulative query lens [s + 1],
        # context lens [s], block tables [s, width].
        self._n64 = 3 * t + s
        nbytes = 8 * self._n64 + 4 * (2 * s + 1 + s * max_blocks)
        self.h_buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
        self.d_buf = self.h_buf.to(device)
        (self.np_ids, self.np_pos, self.np_slots, self.np_last, self.np_cu, self.np_ctx,
         self.np_tables) = (x.numpy() for x in self._views(self.h_buf, t, s))
        self.g_ids, self.g_pos, self.g_slots, self.g_last, self.g_cu, self.g_ctx, self.g_tables = self._views(
            self.d_buf, t, s)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def _views(self, buf: torch.Tensor, t: int, s: int):
        b64 = buf[: 8 * self._n64].view(torch.int64)
        b32 = buf[8 * self._n64 :].view(torch.int32)
        return (b64[:t], b64[t : 2 * t], b64[2 * t : 3 * t], b64[3 * t :], b32[: s + 1], b32[s + 1 : 2 * s + 1],
                b32[2 * s + 1 :].view(s, self.width))

    def bucket(self, tokens: int, seqs: int) -> tuple[int, int] | None:
        t = next((b for b in self.token_buckets if b >= tokens), None)
        s = next((b for b in self.seq_buckets if b >= seqs), None)
        return None if t is None or s is None else (t, s)

    def _context(self, tokens: int, seqs: int) -> Context:
        return Context(is_prefill=True, slot_mapping=self.g_slots[:tokens], block_tables=self.g_tables[:seqs],
                       use_triton=True, block_size=self.block_size, triton_prefill=True,
                       cu_query_lens=self.g_cu[: seqs + 1], context_lens=self.g_ctx[:seqs], max_query_len=tokens)

    def capture(self, pool) -> None:
        """One graph per (tokens, sequences) bucket, largest first, in ``pool`` (shared with the
        decode graphs: no two graphs ever run at once). Warm-up and capture run on inputs that
        store nothing (every slot -1) and query nothing (every query length 0 but the first's 1)."""
        self.np_slots[:] = -1
        self.np_cu[:] = 1
        self.np_cu[0] = 0
        self.np_ctx[:] = 1
        self.np_last[:] = 0
        self.d_buf.copy_(self.h_buf)
        for tokens in reversed(self.token_buckets):
            for seqs in reversed(self.seq_buckets):
                if seqs > tokens:
                    continue
                set_context(self._context(tokens, seqs))
                with torch.inference_mode():
                    ids, pos, last = self.g_ids[:tokens], self.g_pos[:tokens], self.g_last[:seqs]
                    self.model(ids, pos)  # warm-up: compiles this bucket's kernels
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        hidden = self.model(ids, pos)
                        self.logits[tokens, seqs] = self.model.compute_logits(hidden.index_select(0, last)).float()
                reset_context()
                pool = pool or graph.pool()
                self.graphs[tokens, seqs] = graph
        torch.cuda.synchronize()

    def run(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor | None:
        """Prefill each (token_ids, start, block_table) chunk at positions start.. of its sequence;
        returns fp32 logits whose row i is chunk i's last token's (valid until the next replay),
        or None, running nothing, when no captured bucket holds the step."""
        key = self.bucket(sum(len(c[0]) for c in chunks), len(chunks))
        if key is None:
            return None
        tokens, seqs = key
        bs, row = self.block_size, 0
        self.np_cu[0] = 0
        for i, (ids, start, table) in enumerate(chunks):
            n = len(ids)
            self.np_ids[row : row + n] = ids
            pos = self.np_pos[row : row + n]
            pos[:] = np.arange(start, start + n)
            self.np_slots[row : row + n] = np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs
            self.np_tables[i, : len(table)] = table
            self.np_ctx[i] = start + n
            row += n
            self.np_last[i] = row - 1
            self.np_cu[i + 1] = row
        self.np_pos[row:tokens] = 0
        self.np_slots[row:tokens] = -1
        self.np_cu[len(chunks) + 1 : seqs + 1] = row  # padding sequences: no query tokens
        self.np_ctx[len(chunks) : seqs] = 1
        self.np_last[len(chunks) : seqs] = 0
        # The host buffer is rewritten only after this step's logits were read back (a sync).
        self.d_buf.copy_(self.h_buf, non_blocking=True)
        self.graphs[key].replay()
        return self.logits[key]
