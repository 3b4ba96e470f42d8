"""Runs the model for one scheduled step: builds the inputs and the attention context, runs the
forward (a captured CUDA graph for decode on GPU), and samples.

A multi-step decode batch (``batch.num_steps`` > 1, all rows plain greedy) runs its forwards back
to back without returning to the host: between two forwards the decode inputs on the device are
advanced there (next ids = argmax, positions and context lengths + 1, slots looked up in the block
tables), each step's argmax lands in a row of a [steps, batch] device buffer, and one copy with
one sync brings all the tokens back."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.context import Context, reset_context, set_context
from engine.layers.attention import Attention
from engine.layers.sampler import sample, token_logprobs
from engine.models import model_class
from engine.prefill_graphs import PrefillGraphs
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs
from kernels.greedy_advance import greedy_advance, greedy_advance_ref
from kernels.paged_attention import choose_num_splits

# Minimum tokens per flash-decoding partition: small enough that a batch-1 decode over a few
# hundred tokens still spreads over many SMs.
DECODE_PARTITION = 128


@dataclass
class StepResult:
    # Aligned with the batch's sequences; None where the sequence only advanced (a prompt chunk).
    tokens: list[int | None]
    logprobs: list[TokenLogprobs | None]
    # Multi-step decode: per sequence, its greedy token of every step, in order (tokens is unused).
    step_tokens: list[list[int]] | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        hf = config.hf_config
        torch.manual_seed(config.seed)
        if model is None:
            default_dtype = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    model = model_class(hf)(hf, max_position=config.max_model_len)
            finally:
                torch.set_default_dtype(default_dtype)
            if config.load_format == "dummy":
                model.init_dummy_weights()
            else:
                model.load_weights(config.model)
        self.model = model.to(self.device).eval()
        self.model.model.fused_decode = config.fused_decode
        self.model.model.pdl = config.pdl
        # rotary tables stay fp32 for exactness
        self.model.model.rotary.float()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attn_layers:
            layer.pdl = config.pdl
        self.num_kv_heads = self.attn_layers[0].num_kv_heads
        self.head_dim = self.attn_layers[0].head_dim
        self.max_blocks_per_seq = math.ceil(config.max_model_len / self.block_size)
        self.num_blocks = self._allocate_kv_cache()
        self.eos_token_ids: set[int] = set()  # set by the engine; masked for min_tokens
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.graph_max_bs = 0
        self.prefill_graphs: PrefillGraphs | None = None
        self._alloc_decode_buffers()
        if self.use_graphs:
            self._capture_decode_graphs()

    # -- KV cache --------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.attn_layers) * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        per_block = self.kv_bytes_per_token * self.block_size
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_tokens is not None:
            num_blocks = math.ceil(cfg.kv_cache_tokens / self.block_size)
        elif self.device.type == "cuda":
            num_blocks = self._blocks_from_free_memory(per_block)
        else:
            tokens = min(cfg.max_num_seqs * cfg.max_model_len, 1 << 16)
            num_blocks = math.ceil(max(tokens, cfg.max_model_len) / self.block_size)
        if num_blocks * self.block_size < cfg.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of "
                f"max_model_len={cfg.max_model_len}"
            )
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        for layer in self.attn_layers:
            layer.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        return num_blocks

    def _blocks_from_free_memory(self, per_block: int) -> int:
        cfg = self.config
        # An engine dropped earlier in this process may be garbage in a reference cycle: collect it
        # and return its cached blocks, or its pool would count as this engine's "current" memory.
        gc.collect()
        torch.cuda.empty_cache()
        # Peak activations of a full prefill step, measured by running one with no cache.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # A full step: max_num_batched_tokens tokens in sequences of up to max_model_len tokens.
        seq_len = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        lens = [seq_len] * (cfg.max_num_batched_tokens // seq_len)
        if cfg.max_num_batched_tokens % seq_len:
            lens.append(cfg.max_num_batched_tokens % seq_len)
        tokens = sum(lens)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        set_context(Context(is_prefill=True, query_lens=lens, context_lens_host=lens,
                            use_triton=self.config.triton_enabled))
        with torch.inference_mode():
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[: min(len(hidden), cfg.max_num_seqs)]).float()
            del hidden
        reset_context()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        current = torch.cuda.memory_allocated()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * cfg.gpu_memory_utilization - used_by_others - current - (peak - current)
        # Leave room for the CUDA graphs (their logits and activations), the sampler's fp32 copies
        # of the logits, and allocator fragmentation: a pool that leaves the allocator no slack
        # makes it free and re-allocate every step, which costs far more than the blocks gained.
        budget -= 4 * cfg.cuda_graph_max_bs * self.model.config.vocab_size * 4 + (1 << 30)
        return max(int(budget // per_block), 0)

    # -- input building ----------------------------------------------------------------------
    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def run(self, batch: ScheduledBatch) -> StepResult:
        # A with-block, not the decorator: the decorator clones its context manager on every
        # call, which costs about twice as much host time per step.
        with torch.inference_mode():
            if batch.is_prefill:
                rows, logits = self._run_prefill(batch)
            elif batch.num_steps > 1:
                return self._sample(batch, [], self._run_decode_steps(batch))
            else:
                logits = self._run_decode(batch)
                rows = list(range(len(batch.seqs)))
            return self._sample(batch, rows, logits)

    def _run_prefill(self, batch: ScheduledBatch):
        self._forget_rows()  # block tables may have been replaced (see _alloc_decode_buffers)
        graphed = self._run_prefill_graph(batch)
        if graphed is not None:
            return graphed
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # row in the flat token batch whose logits are sampled
        prompt_rows: dict[int, tuple[int, int]] = {}  # seq index -> (first row, count) for prompt logprobs
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled)):
            start = seq.num_computed_tokens
            row0 = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slot(seq, p) for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            sample_rows.append(row0 + n - 1 if batch.samples(i) else -1)
            if seq.params.prompt_logprobs is not None:
                prompt_rows[i] = (row0, n)
        triton_prefill = self.config.triton_enabled and self.config.prefill_attention == "triton"
        tables = None
        if triton_prefill or any(q != c for q, c in zip(query_lens, context_lens)):
            tables = self._block_tables(batch.seqs)
        ctx = Context(
            is_prefill=True,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables,
            query_lens=query_lens,
            context_lens_host=context_lens,
            use_triton=self.config.triton_enabled,
            block_size=self.block_size,
        )
        if triton_prefill:
            cu = [0]
            for n in query_lens:
                cu.append(cu[-1] + n)
            ctx.triton_prefill = True
            ctx.cu_query_lens = torch.tensor(cu, dtype=torch.int32, device=self.device)
            ctx.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=self.device)
            ctx.max_query_len = max(query_lens)
        set_context(ctx)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
        )
        reset_context()
        want = [r for r in sample_rows if r >= 0]
        logits = self.model.compute_logits(hidden[want]).float() if want else None
        for i, (row0, n) in prompt_rows.items():
            self._prompt_logprobs(batch.seqs[i], hidden[row0 : row0 + n], n)
        rows = [want.index(r) if r >= 0 else -1 for r in sample_rows]
        return rows, logits

    def _run_prefill_graph(self, batch: ScheduledBatch):
        """(rows, logits) of a prefill step that a captured graph can run, else None."""
        if self.prefill_graphs is None or any(seq.params.prompt_logprobs is not None for seq in batch.seqs):
            return None
        chunks = [(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n], seq.num_computed_tokens,
                   seq.block_table) for seq, n in zip(batch.seqs, batch.num_scheduled)]
        logits = self.prefill_graphs.run(chunks)
        if logits is None:  # no bucket holds the step
            return None
        rows = [i if batch.samples(i) else -1 for i in range(len(batch.seqs))]
        return rows, logits

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, n: int) -> None:
        """Append logprobs of the prompt tokens this chunk predicts (the first prompt token gets None).
        Entry k of seq.prompt_logprobs belongs to prompt token k; a recompute after preemption
        skips entries already recorded."""
        start = seq.num_computed_tokens
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        lp = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1).cpu()
        top_n = seq.params.prompt_logprobs or 0
        for j in range(n):
            nxt = start + j + 1
            if nxt >= seq.num_prompt_tokens:
                break
            if nxt == len(seq.prompt_logprobs):
                seq.prompt_logprobs.append(token_logprobs(lp[j], seq.token_ids[nxt], top_n))

    # -- decode inputs ---------------------------------------------------------------------------
    def _alloc_decode_buffers(self) -> None:
        """Every decode input lives in one staging buffer, laid out as [ids | positions | slots |
        start positions] (int64, one row each) then [context lens | block tables] (int32); the
        start positions (a multi-step batch's first positions) say which step a token belongs to.
        A step writes the host copy through numpy views and moves it with one host-to-device copy
        (pinned memory, async), instead of building a tensor, a pageable copy and a fill per input. The device copy's
        views are the CUDA graphs' static inputs; on the CPU host and device buffers are one."""
        rows, width = self.config.max_num_seqs, self.max_blocks_per_seq
        self._n64 = 4 * rows
        nbytes = 8 * self._n64 + 4 * rows * (1 + width)
        on_cuda = self.device.type == "cuda"
        self.h_buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_cuda)

        def views(buf: torch.Tensor):
            b64 = buf[: 8 * self._n64].view(torch.int64).view(4, rows)
            b32 = buf[8 * self._n64 :].view(torch.int32)
            return b64[0], b64[1], b64[2], b64[3], b32[:rows], b32[rows:].view(rows, width)

        h = views(self.h_buf)
        self.np_ids, self.np_pos, self.np_slots, self.np_start, self.np_lens, self.np_tables = (t.numpy() for t in h)
        # Padding rows of a graph bucket: store nothing (slot -1), attend to one token.
        self.np_slots[:] = -1
        self.np_lens[:] = 1
        self.d_buf = self.h_buf.to(self.device) if on_cuda else self.h_buf
        self.g_ids, self.g_pos, self.g_slots, self.g_start, self.g_lens, self.g_tables = views(self.d_buf)
        # Block tables are rewritten only where they changed: row i remembers whose table it holds
        # and how many entries are written. Decode only ever appends blocks; a table replaced
        # (preemption, then re-admission) always passes through a prefill step, which forgets all rows.
        self._row_seq = [-1] * rows
        self._row_blocks = [0] * rows
        self._eager_steps: dict[int, tuple] = {}
        self._splits: int | None = None  # what the attention layers hold now
        # Multi-step decode: step k's tokens are row k of a [steps, rows] view of d_tokens; one
        # copy to the (pinned) host buffer brings them all back.
        n_tok = self.config.num_decode_steps * rows
        self.d_tokens = torch.zeros(n_tok, dtype=torch.int64, device=self.device)
        self.h_tokens = torch.zeros(n_tok, dtype=torch.int64, pin_memory=True) if on_cuda else self.d_tokens

    def _forget_rows(self) -> None:
        self._row_seq = [-1] * len(self._row_seq)

    def _prepare_decode(self, seqs: list[Sequence], rows: int) -> None:
        """Fill the staging buffer for ``seqs`` (padded to ``rows``) and start its copy."""
        n = len(seqs)
        bs = self.block_size
        tables, row_seq, row_blocks = self.np_tables, self._row_seq, self._row_blocks
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
        self.np_ids[:n] = ids
        self.np_lens[:n] = lens
        self.np_pos[:n] = self.np_lens[:n] - 1
        self.np_start[:n] = self.np_pos[:n]
        self.np_slots[:n] = slots
        if rows > n:
            self.np_slots[n:rows] = -1
            self.np_lens[n:rows] = 1
        if self.d_buf is not self.h_buf:
            # Only the prefix the step reads: four int64 rows, the lens, then `rows` table rows.
            # The host buffer is rewritten next step only after this step's tokens came back (a
            # sync), so the async copy has finished reading it by then.
            nbytes = 8 * self._n64 + 4 * (self.np_lens.shape[0] + rows * self.max_blocks_per_seq)
            self.d_buf[:nbytes].copy_(self.h_buf[:nbytes], non_blocking=True)

    def _run_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        rows = self._decode_rows(n)
        self._prepare_decode(batch.seqs, rows)
        return self._decode_forward(n, rows)

    def _decode_rows(self, n: int) -> int:
        """Rows the decode inputs span: the CUDA-graph bucket for n sequences, else n itself."""
        return self._bucket_of[n] if self.use_graphs and n <= self.graph_max_bs else n

    def _decode_forward(self, n: int, rows: int) -> torch.Tensor:
        """Logits [n, vocab] (fp32) of the decode inputs now in the device buffers."""
        if self.use_graphs and n <= self.graph_max_bs:
            self.graphs[rows].replay()
            return self.g_logits[rows][:n]  # fp32 inside the graph
        ids, positions, ctx, splits = self._eager_decode_step(n)
        if self._splits != splits:  # module attribute writes are slow: only on a change
            for layer in self.attn_layers:
                layer.num_splits, layer.partition = splits, DECODE_PARTITION
            self._splits = splits
        set_context(ctx)
        hidden = self.model(ids, positions)
        reset_context()
        return self.model.compute_logits(hidden).float()

    # -- multi-step decode -------------------------------------------------------------------------
    def _run_decode_steps(self, batch: ScheduledBatch) -> torch.Tensor:
        """``batch.num_steps`` greedy decode steps back to back on the device: [steps, n] tokens,
        still on the device (_sample fetches them). The scheduler gave every sequence blocks for
        all the steps, and kept every position below max_model_len. Nothing here waits for the
        device."""
        seqs, steps = batch.seqs, batch.num_steps
        n = len(seqs)
        rows = self._decode_rows(n)
        self._prepare_decode(seqs, rows)
        out = self.d_tokens[: steps * rows].view(steps, rows)
        if self.use_graphs and n <= self.graph_max_bs:
            for _ in range(steps):
                self.step_graphs[rows].replay()  # forward, argmax, next inputs
        else:
            for _ in range(steps):
                self._greedy_advance(self._decode_forward(n, rows), rows, out)
        return out[:, :n]

    def _greedy_advance(self, logits: torch.Tensor, rows: int, out: torch.Tensor) -> None:
        """Tokens of this step into out [steps, rows]; the decode inputs of rows [0, rows) become
        the next step's (kernels/greedy_advance.py)."""
        fn = greedy_advance if self.config.triton_enabled else greedy_advance_ref
        fn(logits, self.g_ids[:rows], self.g_pos[:rows], self.g_lens[:rows], self.g_slots[:rows],
           self.g_tables[:rows], self.g_start[:rows], out, self.block_size)

    def _fetch_tokens(self, out: torch.Tensor) -> list[list[int]]:
        """[steps, n] device tokens -> per sequence, its tokens in step order; the one sync."""
        if out.device.type == "cuda":
            host = self.h_tokens[: out.numel()].view(out.shape)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            out = host
        return out.t().tolist()

    def _eager_decode_step(self, bs: int):
        """Per batch size, made once: input views, attention context and split count. The views
        point into the static decode buffers, so they stay valid from step to step."""
        step = self._eager_steps.get(bs)
        if step is None:
            splits = 1
            if self.config.triton_enabled:
                # Same rule as the captured graphs, so eager and graph decode compute identically.
                splits = choose_num_splits(bs, self.num_kv_heads, self.config.max_model_len, DECODE_PARTITION)
            ctx = Context(
                is_prefill=False, slot_mapping=self.g_slots[:bs], context_lens=self.g_lens[:bs],
                block_tables=self.g_tables[:bs], use_triton=self.config.triton_enabled, block_size=self.block_size,
            )
            step = self._eager_steps[bs] = (self.g_ids[:bs], self.g_pos[:bs], ctx, splits)
        return step

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _graph_buckets(self) -> list[int]:
        top = min(self.config.cuda_graph_max_bs, self.config.max_num_seqs)
        buckets = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
        if not buckets or buckets[-1] != top:
            buckets.append(top)
        return buckets

    def _capture_decode_graphs(self) -> None:
        buckets = self._graph_buckets()
        max_bs = buckets[-1]
        self.graph_max_bs = max_bs
        self.g_logits: dict[int, torch.Tensor] = {}
        # Multi-step decode, per bucket: the forward again with the greedy advance after it, so a
        # step costs the host one replay.
        self.step_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for bs in reversed(buckets):
            splits = choose_num_splits(bs, self.num_kv_heads, self.config.max_model_len, DECODE_PARTITION)
            for layer in self.attn_layers:
                layer.num_splits, layer.partition = splits, DECODE_PARTITION
            set_context(Context(
                is_prefill=False, slot_mapping=self.g_slots[:bs], context_lens=self.g_lens[:bs],
                block_tables=self.g_tables[:bs], use_triton=self.config.triton_enabled, block_size=self.block_size,
            ))
            with torch.inference_mode():
                self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs]))  # warm up / compile
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    # fp32 in the graph: the sampler's copy costs no extra launch per step.
                    self.g_logits[bs] = self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs])).float()
                if pool is None:
                    pool = graph.pool()
                self.graphs[bs] = graph
                if self.config.num_decode_steps > 1:
                    self.step_graphs[bs] = self._capture_step_graph(bs, pool)
            reset_context()
        cfg = self.config
        max_tokens = min(cfg.prefill_graph_max_tokens, cfg.max_num_batched_tokens, cfg.max_model_len)
        if max_tokens >= 16 and cfg.triton_enabled and cfg.prefill_attention == "triton":
            self.prefill_graphs = PrefillGraphs(self.model, self.device, self.block_size, self.max_blocks_per_seq,
                                               max_tokens, cfg.max_num_seqs)
            self.prefill_graphs.capture(pool)
        torch.cuda.synchronize()
        self.buckets = buckets
        self._bucket_of = [next(b for b in buckets if b >= n) for n in range(max_bs + 1)]  # by batch size
        self._splits = None  # capture left the layers at the last bucket's split count

    def _capture_step_graph(self, bs: int, pool) -> torch.cuda.CUDAGraph:
        """Forward + greedy advance of one multi-step decode step. Only recorded, never run here:
        the decode buffers are left as they are. The argmax reads the 16-bit logits: the fp32 cast
        would not change it."""
        tokens = self.d_tokens[: self.config.num_decode_steps * bs].view(-1, bs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            logits = self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs]))
            self._greedy_advance(logits, bs, tokens)
        return graph

    # -- sampling ----------------------------------------------------------------------------------
    def _sample(self, batch: ScheduledBatch, rows: list[int], logits: torch.Tensor | None) -> StepResult:
        n = len(batch.seqs)
        lps: list[TokenLogprobs | None] = [None] * n
        if batch.num_steps > 1:  # "logits" are the steps' greedy tokens already: fetch them
            return StepResult([None] * n, lps, self._fetch_tokens(logits))
        if not batch.is_prefill and self._plain_greedy(batch.seqs):
            # The common decode step: one argmax and one transfer, no per-row work.
            return StepResult(logits.argmax(dim=-1).tolist(), lps)
        tokens: list[int | None] = [None] * n
        idx = [i for i in range(n) if rows[i] >= 0]
        if not idx or logits is None:
            return StepResult(tokens, lps)
        raw = logits if len(idx) == logits.shape[0] else logits[[rows[i] for i in idx]]
        sel = raw
        for j, i in enumerate(idx):  # min_tokens: stop tokens are impossible until then
            seq = batch.seqs[i]
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = set(seq.params.stop_token_ids) | self.eos_token_ids
                if banned:
                    if sel is raw:
                        sel = raw.clone()  # logprobs stay those of the model
                    sel[j, list(banned)] = float("-inf")
        params = [batch.seqs[i].params for i in idx]
        gens = [self._generator(batch.seqs[i]) for i in idx]
        sampled = sample(sel, params, gens).tolist()
        need_lp = [j for j, i in enumerate(idx) if batch.seqs[i].params.logprobs is not None]
        if need_lp:
            lp = torch.log_softmax(raw[need_lp], dim=-1).cpu()
            for r, j in enumerate(need_lp):
                lps[idx[j]] = token_logprobs(lp[r], sampled[j], batch.seqs[idx[j]].params.logprobs or 0)
        for j, i in enumerate(idx):
            tokens[i] = sampled[j]
        return StepResult(tokens, lps)

    @staticmethod
    def _plain_greedy(seqs: list[Sequence]) -> bool:
        """Every row greedy, without logprobs and past min_tokens: the argmax is the whole answer."""
        for seq in seqs:
            p = seq.params
            if p.temperature != 0.0 or p.logprobs is not None or len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
                return False
        return True

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)
        return seq.generator
