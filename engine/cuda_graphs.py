"""CUDA graphs: capture once, then a step costs the host one replay instead of a launch per kernel.

Decode: one graph per batch-size bucket (1, 2, 4, 8, then multiples of 16), reading the decode
staging buffer (engine/decode_inputs.py); a batch runs in the smallest bucket that holds it, its
padding rows storing nothing. With multi-step decoding each bucket also has a step graph: the
forward with the greedy advance after it (kernels/greedy_advance.py), so a step is one replay. The
same graphs replay a speculative verify staged as pseudo-rows (one row per token,
DecodeInputs.prepare_chunks); capture_graphs sizes the buckets to hold them. A set built with
``verify_query_len`` q replays pseudo-rows of sequences of q tokens each whose attention reads each
sequence's K/V once (multi-query decode attention, Context.verify_query_len), its buckets from q rows.

Prefill: a step of at most ``max_seqs`` sequences and ``prefill_graph_max_tokens`` tokens replays
a graph captured for the next bucket: tokens 16, 32, ..., sequences 1 or ``max_seqs``. Run eagerly
it costs the host a launch per kernel, about 9 per layer: some 20 ms for 16 tokens of SmolLM2-135M
on an H100 host (experiments/prefill_host.py), while the GPU work takes well under a millisecond;
at small batches that is most of the time to the first token. Padding tokens store nothing in the
cache (slot -1) and belong to no sequence's query, which the varlen attention kernel reads from the
cumulative query lengths; padding sequences have no query tokens, so their programs return at once.
The logits are taken at each sequence's last token; a set built with ``all_rows`` (the speculative
verify forward's: k + 1 query tokens per sequence, every one scored) keeps the logits of every
token row instead, and one built with ``verify_query_len`` attends with the multi-query decode
attention (kernels/verify_attention.py), every sequence at most that many tokens.

Every decode and prefill graph keeps the final hidden states its logits came from as a second static
output (``hidden``; no extra kernel, a few KB of pool): a Medusa drafter's features from the verify
(spec_decode/medusa.py). The multi-step step graphs have none (their logits never leave the device).

All graphs share one memory pool: no two ever run at once (capture_graphs captures an engine's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.config import EngineConfig
from engine.context import Context, reset_context, set_context
from engine.decode_inputs import DecodeInputs
from engine.parallel.group import before_destroy, tp_size
from engine.staging import StagingBuffer


def decode_buckets(max_bs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 16))
    if not buckets or buckets[-1] != max_bs:
        buckets.append(max_bs)
    return buckets


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, inputs: DecodeInputs, max_bs: int, num_steps: int,
                 verify_query_len: int = 0) -> None:
        self.model, self.inputs, self.num_steps, self.verify_query_len = model, inputs, num_steps, verify_query_len
        self.buckets = [b for b in decode_buckets(max_bs) if b >= verify_query_len]
        assert self.buckets, f"no decode bucket of at most {max_bs} rows holds {verify_query_len} verify rows"
        self.max_bs = self.buckets[-1]
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(self.max_bs + 1)]  # by batch size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # fp32, per bucket
        self.hidden: dict[int, torch.Tensor] = {}  # the LM head's input rows, the model's dtype, per bucket
        self.step_graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def capture(self, pool=None):
        """Every bucket's graphs, largest first; returns the memory pool they share."""
        model = self.model
        for bs in reversed(self.buckets):
            ids, pos, ctx = self.inputs.views(bs, self.verify_query_len)
            set_context(ctx)
            with torch.inference_mode():
                logits = model.compute_logits(model(ids, pos))  # warm up / compile
                if self.num_steps > 1:  # and the step graph's greedy advance
                    self.inputs.warm_advance(logits, bs, self.inputs.step_tokens(self.num_steps, bs))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    # fp32 in the graph: the sampler's copy costs no extra launch per step. The hidden
                    # rows are kept as a second output (a Medusa drafter's features): no extra kernel.
                    self.hidden[bs] = model(ids, pos)
                    self.logits[bs] = model.compute_logits(self.hidden[bs]).float()
                if pool is None:
                    pool = graph.pool()
                self.graphs[bs] = graph
                if self.num_steps > 1:
                    self.step_graphs[bs] = self._capture_step_graph(bs, pool)
            reset_context()
        torch.cuda.synchronize()
        return pool

    def _capture_step_graph(self, bs: int, pool) -> torch.cuda.CUDAGraph:
        """Forward + greedy advance of one multi-step decode step. Only recorded, never run here:
        the decode buffers are left as they are. The argmax reads the 16-bit logits: the fp32 cast
        would not change it."""
        ids, pos, _ = self.inputs.views(bs)
        tokens = self.inputs.step_tokens(self.num_steps, bs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            logits = self.model.compute_logits(self.model(ids, pos))
            self.inputs.advance(logits, bs, tokens)
        return graph

    def forward(self, n: int, hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, vocab] (fp32) of the decode inputs now in the first rows of the buffers;
        ``hidden``: (logits, the final hidden states [n, hidden] they came from)."""
        rows = self.bucket_of[n]
        self.graphs[rows].replay()
        return (self.logits[rows][:n], self.hidden[rows][:n]) if hidden else self.logits[rows][:n]

    def step(self, rows: int) -> None:
        """One multi-step decode step of bucket ``rows``: forward, argmax, next inputs."""
        self.step_graphs[rows].replay()


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, block_size: int, max_blocks: int,
                 max_tokens: int, max_seqs: int, all_rows: bool = False, verify_query_len: int = 0) -> None:
        self.model, self.block_size = model, block_size
        self.all_rows, self.verify_query_len = all_rows, verify_query_len
        self.token_buckets = [16 << i for i in range(16) if 16 << i <= max_tokens]
        self.seq_buckets = sorted({1, max(1, min(max_seqs, 16))})
        t, s = self.token_buckets[-1], self.seq_buckets[-1]
        i64, i32 = torch.int64, torch.int32
        self.buf = StagingBuffer(device, {
            "ids": (i64, (t,)), "pos": (i64, (t,)), "slots": (i64, (t,)), "last": (i64, (s,)),  # last: row of each seq's last token
            "cu": (i32, (s + 1,)), "ctx": (i32, (s,)), "tables": (i32, (s, max_blocks)),  # cumulative query lens, context lens
        })
        self.h, self.d = self.buf.host, self.buf.dev
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}  # the rows the logits came from

    def bucket(self, tokens: int, seqs: int) -> tuple[int, int] | None:
        t = next((b for b in self.token_buckets if b >= tokens), None)
        s = next((b for b in self.seq_buckets if b >= seqs), None)
        return None if t is None or s is None else (t, s)

    def _context(self, tokens: int, seqs: int) -> Context:
        d = self.d
        return Context(is_prefill=True, slot_mapping=d.slots[:tokens], block_tables=d.tables[:seqs],
                       cu_query_lens=d.cu[: seqs + 1], context_lens=d.ctx[:seqs], max_query_len=tokens,
                       verify_query_len=self.verify_query_len)

    def capture(self, pool) -> None:
        """One graph per (tokens, sequences) bucket, largest first, in ``pool`` (shared with the
        decode graphs). Warm-up and capture run on inputs that store nothing (every slot -1) and
        query nothing (every query length 0 but the first's 1)."""
        h, d = self.h, self.d
        h.slots[:] = -1
        h.cu[:] = 1
        h.cu[0] = 0
        h.ctx[:] = 1
        h.last[:] = 0
        self.buf.copy_to_device()
        for tokens in reversed(self.token_buckets):
            for seqs in reversed(self.seq_buckets):
                if seqs > tokens:
                    continue
                set_context(self._context(tokens, seqs))
                with torch.inference_mode():
                    ids, pos, last = d.ids[:tokens], d.pos[:tokens], d.last[:seqs]

                    def body() -> tuple[torch.Tensor, torch.Tensor]:
                        hidden = self.model(ids, pos)
                        rows = hidden if self.all_rows else hidden.index_select(0, last)
                        return rows, self.model.compute_logits(rows).float()

                    body()  # warm-up: every kernel of the bucket launched once before the capture records it
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        # The hidden rows: a second output of the same kernels (a Medusa drafter's features).
                        self.hidden[tokens, seqs], self.logits[tokens, seqs] = body()
                reset_context()
                pool = pool or graph.pool()
                self.graphs[tokens, seqs] = graph
        torch.cuda.synchronize()

    def run(self, chunks: list[tuple[list[int], int, list[int]]], device_ids: torch.Tensor | None = None,
            hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Prefill each (token_ids, start, block_table) chunk at positions start.. of its sequence;
        returns fp32 logits whose row i is chunk i's last token's (``all_rows``: whose rows are the
        chunks' tokens in order, then padding), valid until the next replay, or None, running
        nothing, when no captured bucket holds the step. ``device_ids``: the chunks' tokens already on the
        device (a model drafter's), copied in after the staged ones. ``hidden``: (logits, the final
        hidden states of the same rows)."""
        key = self.bucket(sum(len(c[0]) for c in chunks), len(chunks))
        if key is None:
            return None
        assert not self.verify_query_len or max(len(c[0]) for c in chunks) <= self.verify_query_len, (
            f"a verify chunk of more than {self.verify_query_len} tokens")
        tokens, seqs = key
        h, bs, row = self.buf.writable(), self.block_size, 0
        h.cu[0] = 0
        for i, (ids, start, table) in enumerate(chunks):
            n = len(ids)
            h.ids[row : row + n] = ids
            pos = h.pos[row : row + n]
            pos[:] = np.arange(start, start + n)
            h.slots[row : row + n] = np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs
            h.tables[i, : len(table)] = table
            h.ctx[i] = start + n
            row += n
            h.last[i] = row - 1
            h.cu[i + 1] = row
        h.pos[row:tokens] = 0
        h.slots[row:tokens] = -1
        h.cu[len(chunks) + 1 : seqs + 1] = row  # padding sequences: no query tokens
        h.ctx[len(chunks) : seqs] = 1
        h.last[len(chunks) : seqs] = 0
        self.buf.copy_to_device()
        if device_ids is not None:
            self.d.ids[:row].copy_(device_ids)
        self.graphs[key].replay()
        return (self.logits[key], self.hidden[key]) if hidden else self.logits[key]


@dataclass
class EngineGraphs:
    """A model runner's graph sets; None where not captured (eager: all of them). ``mq``, ``verify``
    and ``mq_verify`` serve only the speculative verify (spec_decode/verify_paths.py)."""

    decode: DecodeGraphs | None = None
    mq: DecodeGraphs | None = None  # the _mq variants' (multi-query attention)
    prefill: PrefillGraphs | None = None
    verify: PrefillGraphs | None = None
    mq_verify: PrefillGraphs | None = None

    def reset(self) -> None:
        """Release every captured graph (they cannot be replayed after this)."""
        for graph_set in (self.decode, self.mq, self.prefill, self.verify, self.mq_verify):
            if graph_set is not None:
                for graph in (*graph_set.graphs.values(), *getattr(graph_set, "step_graphs", {}).values()):
                    graph.reset()
        torch.cuda.synchronize()


def decode_graph_max_bs(config: EngineConfig, verify_rows: int) -> int:
    """The largest decode graph bucket: the batch sizes graphed, and the pseudo-rows of a verify."""
    return max(min(config.cuda_graph_max_bs, config.max_num_seqs), verify_rows)


def capture_graphs(model: torch.nn.Module, inputs: DecodeInputs, config: EngineConfig, max_blocks: int,
                   verify_max_tokens: int, verify_rows: int, verify_query_len: int) -> EngineGraphs:
    """Every graph set the engine replays, in one memory pool: decode buckets that also hold
    ``verify_rows`` pseudo-rows; with ``verify_query_len``, their multi-query twins; prefill graphs
    (Triton prefill attention only); with ``verify_max_tokens``, the verify graphs that score every
    row, up to the token bucket that holds that many."""
    cfg, device, block_size = config, config.torch_device, config.block_size
    max_bs = decode_graph_max_bs(cfg, verify_rows)
    graphs = EngineGraphs(decode=DecodeGraphs(model, inputs, max_bs, cfg.num_decode_steps))
    if tp_size() > 1:  # graphs holding the group's collectives go before the group does
        before_destroy(graphs.reset)
    pool = graphs.decode.capture()
    if 0 < verify_query_len <= max_bs:
        graphs.mq = DecodeGraphs(model, inputs, max_bs, 1, verify_query_len)
        graphs.mq.capture(pool)
    max_tokens = min(cfg.prefill_graph_max_tokens, cfg.max_num_batched_tokens, cfg.max_model_len)
    if max_tokens >= 16 and cfg.triton_enabled and cfg.prefill_attention == "triton":
        graphs.prefill = PrefillGraphs(model, device, block_size, max_blocks, max_tokens, cfg.max_num_seqs)
        graphs.prefill.capture(pool)
        if verify_max_tokens > 0:  # token buckets are powers of two from 16: the next one holds it all
            verify_tokens = min(max(16, 1 << (verify_max_tokens - 1).bit_length()), max_tokens)
            graphs.verify = PrefillGraphs(model, device, block_size, max_blocks, verify_tokens, cfg.max_num_seqs,
                                          all_rows=True)
            graphs.verify.capture(pool)
            if verify_query_len:
                graphs.mq_verify = PrefillGraphs(model, device, block_size, max_blocks, verify_tokens,
                                                 cfg.max_num_seqs, True, verify_query_len)
                graphs.mq_verify.capture(pool)
    torch.cuda.synchronize()
    return graphs


def gpu_seconds(run: Callable[[], object]) -> float:
    """Seconds of device time one call of ``run`` takes (CUDA events around it; syncs)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def device_seconds(run: Callable[[], object], graph: bool, warmup: int = 3, repeats: int = 7,
                   reduce: Callable[[list[float]], float] = np.median) -> float:
    """Device seconds (gpu_seconds) of one call of ``run``, ``reduce`` (median; min for a best-of) of
    ``repeats`` timings after one eager call (it compiles and loads its kernels: a first launch
    inside a capture would invalidate it) and ``warmup`` more. With ``graph``: of one replay of a
    CUDA graph that captured it, what a graphed step of that code costs the GPU without the host's
    launch cost an eager run would also time (the graph is released after); without: the eager
    run's, host gaps included, as an eager engine runs it."""
    run()
    captured = None
    if graph:
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
    for _ in range(warmup):
        run()
    seconds = float(reduce([gpu_seconds(run) for _ in range(repeats)]))
    if captured is not None:
        captured.reset()
    return seconds
