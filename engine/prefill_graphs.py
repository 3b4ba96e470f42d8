"""CUDA graphs for short prefills of one sequence.

A prefill run eagerly costs the host a launch per kernel: about 9 per layer, some 20 ms for 16
tokens of SmolLM2-135M on an H100 host (experiments/prefill_host.py), while the GPU work takes
well under a millisecond. At batch 1 that is most of the time to the first token, and a tenth of
a 256-token generation. So a step that prefills (or continues) one sequence with at most
``prefill_graph_max_tokens`` tokens replays a graph captured for the next bucket of token counts
(16, 32, 64, ...): the padding tokens store nothing in the cache (slot -1) and sit past the
sequence's query length, where the varlen attention kernel ignores them; the logits are taken at
the last real token. Everything the graph reads is in one staging buffer, moved with one
host-to-device copy per step, as the decode graphs do.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.context import Context, reset_context, set_context


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, block_size: int, max_blocks: int,
                 max_tokens: int) -> None:
        self.model, self.device, self.block_size, self.width = model, device, block_size, max_blocks
        self.buckets = []
        t = 16
        while t <= max_tokens:
            self.buckets.append(t)
            t *= 2
        top = self.buckets[-1] if self.buckets else 0
        # int64 [ids | positions | slots] x top, then [last row]; int32 [cu_q (2) | context len | table].
        self._n64 = 3 * top + 1
        nbytes = 8 * self._n64 + 4 * (3 + max_blocks)
        self.h_buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
        self.d_buf = self.h_buf.to(device)
        h, d = self._views(self.h_buf, top), self._views(self.d_buf, top)
        self.np_ids, self.np_pos, self.np_slots, self.np_last, self.np_cu, self.np_ctx, self.np_table = (
            x.numpy() for x in h)
        self.g_ids, self.g_pos, self.g_slots, self.g_last, self.g_cu, self.g_ctx, self.g_table = d
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _views(self, buf: torch.Tensor, top: int):
        b64 = buf[: 8 * self._n64].view(torch.int64)
        b32 = buf[8 * self._n64 :].view(torch.int32)
        return (b64[:top], b64[top : 2 * top], b64[2 * top : 3 * top], b64[3 * top :], b32[:2], b32[2:3],
                b32[3:].view(1, self.width))

    def bucket(self, tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= tokens), None)

    def _context(self, tokens: int) -> Context:
        return Context(is_prefill=True, slot_mapping=self.g_slots[:tokens], block_tables=self.g_table,
                       use_triton=True, block_size=self.block_size, triton_prefill=True,
                       cu_query_lens=self.g_cu, context_lens=self.g_ctx, max_query_len=tokens)

    def capture(self, pool) -> None:
        """One graph per bucket, largest first, in ``pool`` (shared with the decode graphs: no two
        graphs ever run at once). The warm-up runs on inputs that store nothing (slots -1)."""
        self.np_slots[:] = -1
        self.np_cu[:] = (0, 1)
        self.np_ctx[:] = 1
        self.np_last[:] = 0
        self.d_buf.copy_(self.h_buf)
        for tokens in reversed(self.buckets):
            set_context(self._context(tokens))
            with torch.inference_mode():
                ids, pos = self.g_ids[:tokens], self.g_pos[:tokens]
                self.model(ids, pos)  # warm-up: compiles this bucket's kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    hidden = self.model(ids, pos)
                    self.logits[tokens] = self.model.compute_logits(hidden.index_select(0, self.g_last)).float()
            reset_context()
            pool = pool or graph.pool()
            self.graphs[tokens] = graph
        torch.cuda.synchronize()

    def run(self, token_ids: list[int], start: int, table: list[int]) -> torch.Tensor:
        """Prefill token_ids at positions start.. of a sequence with block table ``table``;
        returns the fp32 logits [1, vocab] of its last token (valid until the next replay)."""
        n = len(token_ids)
        tokens = self.bucket(n)
        bs = self.block_size
        self.np_ids[:n] = token_ids
        self.np_pos[:n] = range(start, start + n)
        self.np_pos[n:tokens] = 0
        pos = self.np_pos[:n]
        self.np_slots[:n] = np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs
        self.np_slots[n:tokens] = -1
        self.np_last[0] = n - 1
        self.np_cu[1] = n
        self.np_ctx[0] = start + n
        self.np_table[0, : len(table)] = table
        # The host buffer is rewritten only after this step's logits were read back (a sync).
        self.d_buf.copy_(self.h_buf, non_blocking=True)
        self.graphs[tokens].replay()
        return self.logits[tokens]
