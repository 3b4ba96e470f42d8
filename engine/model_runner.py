"""Runs the model for one scheduled step: builds the inputs and the attention context, runs the
forward (a captured CUDA graph where one fits), and samples. Every step returns a list of new
tokens per sequence (engine/layers/sampler.py's ``StepResult``).

A multi-step decode batch (``batch.num_steps`` > 1, all rows plain greedy) runs its forwards back
to back without returning to the host: between two forwards the decode inputs on the device are
advanced there (next ids = argmax, positions and context lengths + 1, slots looked up in the block
tables), each step's argmax lands in a row of a [steps, batch] device buffer, and one copy with
one sync brings all the tokens back (engine/decode_inputs.py).

Its parts: kv_cache.py sizes and allocates the paged pool; decode_inputs.py stages the decode
inputs (staging.py's one-copy buffer, shared with the prefill graphs); cuda_graphs.py captures and
replays the decode, multi-step and prefill graphs; layers/sampler.py turns logits into tokens;
spec_decode/verify_paths.py (``verify_paths``) runs a speculative verify's chunk forwards through
this runner's decode and prefill paths. The model gets the engine's constants once, at
construction (layers/options.py)."""

from __future__ import annotations

import math

import torch

from engine.config import EngineConfig
from engine.context import Context, reset_context, set_context
from engine.cuda_graphs import EngineGraphs, capture_graphs, decode_graph_max_bs
from engine.decode_inputs import DecodeInputs
from engine.fused_rows import set_fused_rows
from engine.kv_cache import allocate_kv_cache, kv_bytes_per_token
from engine.layers.attention import Attention
from engine.layers.sampler import PromptLogprobs, Sampler, StepResult, device_tensor
from engine.models import model_class
from engine.parallel.group import group_for
from engine.parallel.workers import start_workers
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec_decode.draft_vocab import restrict_lm_head
from engine.spec_decode.verify_paths import VerifyPaths
from engine.weight_form import set_weight_form
from kernels.gemv import SMALL_M


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int] | frozenset[int] = frozenset(),
                 extra_kv_bytes_per_token: int = 0, verify_max_tokens: int = 0, verify_query_len: int = 0,
                 lm_head_rows: torch.Tensor | None = None) -> None:
        """``extra_kv_bytes_per_token``: a draft model's cache, sized with this one (kv_cache.py).
        ``verify_max_tokens``: the most tokens of a speculative verify forward: the decode rows
        and graphs take up to SMALL_M of them as pseudo-rows; with CUDA graphs, larger verify
        forwards of up to that many tokens replay prefill graphs that score every row.
        ``verify_query_len``: the most tokens a sequence verifies (k + 1), 0 without the multi-query
        verify variants. ``lm_head_rows``: the token ids whose logits the model computes, -inf for
        the others (a drafter's vocabulary, spec_decode/draft_vocab.py); None: all."""
        # Rank 0 of a tensor-parallel engine starts and drives the other ranks (engine/parallel),
        # their runners with its verify graphs. A runner of one rank in a larger group (a draft
        # model on rank 0) runs no collectives (group_for).
        self.tp_workers = start_workers(config, ModelRunner, verify_max_tokens=verify_max_tokens,
                                        verify_query_len=verify_query_len)
        try:
            with group_for(config.tensor_parallel_size):
                self._setup(config, eos_token_ids, extra_kv_bytes_per_token, verify_max_tokens, verify_query_len,
                            lm_head_rows)
        except BaseException:
            self.close()
            raise

    def _setup(self, config: EngineConfig, eos_token_ids: set[int] | frozenset[int], extra_kv_bytes_per_token: int,
               verify_max_tokens: int, verify_query_len: int, lm_head_rows: torch.Tensor | None) -> None:
        self.config, self.verify_query_len = config, verify_query_len
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        torch.manual_seed(config.seed)
        self.model = self._build_model().to(self.device).eval()
        if lm_head_rows is not None:  # before any graph captures the head
            restrict_lm_head(self.model, lm_head_rows)
        self.model.model.rotary.float()  # rotary tables stay fp32 for exactness
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_bytes_per_token = kv_bytes_per_token(self.attn_layers, self.dtype)
        # Prefix caching of prompt logprobs (block_manager.py): per block, the final hidden state at
        # its last position, written by a prompt-logprob prefill. Counted when the pool is sized,
        # allocated by the first prompt-logprob prefill (a draft model's runner never runs one).
        hidden_bytes = config.hf_config.hidden_size * self.dtype.itemsize if config.enable_prefix_caching else 0
        self.num_blocks = allocate_kv_cache(config, self.model, self.attn_layers,
                                            extra_kv_bytes_per_token + -(-hidden_bytes // self.block_size))
        self.block_hidden: torch.Tensor | None = None
        self.sampler = Sampler(self.device, set(eos_token_ids))  # EOS is masked until min_tokens
        max_blocks = math.ceil(config.max_model_len / self.block_size)
        # Decode rows for a verify as pseudo-rows (decode_inputs.py): what the fused small-batch
        # matmuls take; larger verify forwards go through the prefill path. In batch-invariant mode
        # every verify runs as pseudo-rows (spec_decode/verify_paths.py): no verify-only graph sets.
        invariant = config.batch_invariant
        verify_rows = verify_max_tokens if invariant else min(verify_max_tokens, SMALL_M)
        decode_rows = max(config.max_num_seqs, verify_rows)
        self.decode_inputs = DecodeInputs(self.device, decode_rows, max_blocks, self.block_size,
                                          config.num_decode_steps, config.triton_enabled)
        graphed = self.device.type == "cuda" and not config.enforce_eager
        max_rows = decode_graph_max_bs(config, verify_rows) if graphed else decode_rows
        # Weight-only codes or their dense weights, whichever decodes faster (weight_form.py, compressed_weights
        # "auto"): form -> {rows: device us}; then the decode rows that take the fused path on the form kept, timed
        # before any graph records one (fused_rows.py): bucket -> {"fused", "unfused"} device us ({}: not timed).
        self.weight_form_us = set_weight_form(self, max_rows, graphed)
        self.fused_rows_us = set_fused_rows(self, max_rows, graphed)
        graphs = EngineGraphs()
        if graphed:
            graphs = capture_graphs(self.model, self.decode_inputs, config, max_blocks,
                                    0 if invariant else verify_max_tokens, verify_rows,
                                    0 if invariant else verify_query_len)
        self.graphs, self.prefill_graphs = graphs.decode, graphs.prefill
        # Each verify takes the path measured fastest at its token count (spec_decode/verify_paths.py).
        self.verify_paths = VerifyPaths(self, graphs, decode_rows)
        self.verify_paths.time(min(verify_max_tokens, self.verify_paths.max_pseudo_rows),
                               wide_tokens=verify_max_tokens)

    def _build_model(self) -> torch.nn.Module:
        cfg, hf = self.config, self.config.hf_config
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_class(hf)(hf, max_position=cfg.max_model_len, options=cfg.model_options())
        finally:
            torch.set_default_dtype(default_dtype)
        if cfg.load_format == "dummy":
            model.init_dummy_weights()
        else:
            model.load_weights(cfg.model)
        return model

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.tp_workers is not None:
            self.tp_workers.close()

    def run(self, batch: ScheduledBatch) -> StepResult:
        if self.tp_workers is not None:  # the workers run the same step on their shards
            return self.tp_workers.run(batch, self._run)
        return self._run(batch)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        # A with-block, not the decorator: the decorator clones its context manager on every
        # call, which costs about twice as much host time per step.
        with torch.inference_mode():
            if batch.is_prefill:
                return self._run_prefill(batch)
            if batch.num_steps > 1:
                return StepResult(self.decode_steps(batch.seqs, batch.num_steps))
            return self.sampler.sample_step(batch.seqs, self._run_decode(batch))

    # -- prefill -----------------------------------------------------------------------------------
    def _run_prefill(self, batch: ScheduledBatch) -> StepResult:
        self.decode_inputs.forget_rows()  # block tables may have been replaced (see DecodeInputs)
        seqs = batch.seqs
        chunks = [(s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n], s.num_computed_tokens,
                   s.block_table) for s, n in zip(seqs, batch.num_scheduled)]
        to_logits = None  # rows of `out` are logits already (batch-invariant mode), else hidden states
        if self.config.batch_invariant:
            out = self._prefill_as_pseudo_rows(chunks)
        else:
            if self.prefill_graphs is not None and not any(s.params.prompt_logprobs is not None for s in seqs):
                logits = self.prefill_graphs.run(chunks)
                if logits is not None:  # else no bucket holds the step
                    return self.sampler.sample_step(seqs, logits,
                                                    [i if batch.samples(i) else -1 for i in range(len(seqs))])
            out, to_logits = self.varlen_forward(chunks), self.model.compute_logits
        last_rows: list[int] = []  # row in the flat token batch whose logits are sampled, or -1
        prompt_logprobs = PromptLogprobs()
        row0 = 0
        for i, n in enumerate(batch.num_scheduled):
            last_rows.append(row0 + n - 1 if batch.samples(i) else -1)
            if seqs[i].params.prompt_logprobs is not None:
                if to_logits is None:
                    self.sampler.prompt_logprobs(seqs[i], out[row0 : row0 + n].float(), seqs[i].num_computed_tokens,
                                                 prompt_logprobs)
                else:
                    self._prompt_logprobs(seqs[i], out[row0 : row0 + n], prompt_logprobs)
            row0 += n
        prompt_logprobs.record()
        want = [r for r in last_rows if r >= 0]
        logits = (out[want] if to_logits is None else to_logits(out[want])).float() if want else None
        rows, k = [], 0  # each sequence's row in logits
        for r in last_rows:
            rows.append(k if r >= 0 else -1)
            k += r >= 0
        return self.sampler.sample_step(seqs, logits, rows)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, step: PromptLogprobs) -> None:
        """Prompt logprobs of a prefill chunk (``hidden``: its rows). A chunk that starts a block
        (after a prefix-cache hit) scores its first token from the hidden state kept with the block
        before it; each block the chunk completes keeps the hidden state at its last position."""
        start, bs, table = seq.num_computed_tokens, self.block_size, seq.block_table
        if not self.config.enable_prefix_caching:
            return self.sampler.prompt_logprobs(seq, self.model.compute_logits(hidden).float(), start, step)
        if self.block_hidden is None:
            self.block_hidden = hidden.new_zeros(self.num_blocks, hidden.shape[-1])
        ends = range(start + bs - 1 - start % bs, start + len(hidden), bs)  # last positions of blocks
        if ends:
            blocks = device_tensor([table[p // bs] for p in ends], self.device, torch.long)
            self.block_hidden[blocks] = hidden[ends.start - start :: bs]
        if start > 0 and start % bs == 0:
            hidden, start = torch.cat([self.block_hidden[table[start // bs - 1]][None], hidden]), start - 1
        self.sampler.prompt_logprobs(seq, self.model.compute_logits(hidden).float(), start, step)

    def _prefill_as_pseudo_rows(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Batch-invariant mode's prefill logits: every prompt token a decode pseudo-row
        (VerifyPaths.pseudo_row_logits, in forwards of at most the decode rows), so that its K/V and
        logits are what the decode kernels compute for it, whatever else the step holds, however the
        prompt is chunked, and again after a preemption's recompute. Slower than the varlen prefill:
        each 16-row tile rereads the weights, each row its context."""
        return self.verify_paths.pseudo_row_logits(chunks)

    def varlen_forward(self, chunks: list[tuple[list[int], int, list[int]]],
                       ids: torch.Tensor | None = None, verify_query_len: int = 0) -> torch.Tensor:
        """Hidden states [tokens, hidden] of each (token_ids, start, block_table) chunk computed at
        positions start.. of its sequence, eagerly (their K/V written to the cache): the prefill
        path, also the speculative verify forward and a draft model's catch-up. ``ids``: the
        chunks' tokens already on the device (see VerifyPaths.all_logits); ``verify_query_len``: attention
        through the multi-query decode kernel (every chunk at most that long)."""
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        bs = self.block_size
        for tokens, start, table in chunks:
            n = len(tokens)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
        set_context(self._prefill_context([c[2] for c in chunks], slots, query_lens, context_lens, verify_query_len))
        if ids is None:
            ids = device_tensor([t for c in chunks for t in c[0]], self.device, torch.long)
        hidden = self.model(ids, device_tensor(positions, self.device, torch.long))
        reset_context()
        return hidden

    def _prefill_context(self, tables: list[list[int]], slots: list[int], query_lens: list[int],
                         context_lens: list[int], verify_query_len: int = 0) -> Context:
        """Block tables where attention reads the cache (the Triton varlen and the multi-query verify
        kernels always do; SDPA only for a chunk after the first or a prefix-cache hit)."""
        cfg, dev = self.config, self.device
        triton_prefill = verify_query_len > 0 or (cfg.triton_enabled and cfg.prefill_attention == "triton")
        ctx = Context(is_prefill=True, slot_mapping=device_tensor(slots, dev, torch.long),
                      query_lens=query_lens, context_lens_host=context_lens, verify_query_len=verify_query_len)
        if triton_prefill or any(q != c for q, c in zip(query_lens, context_lens)):
            width = max(len(t) for t in tables)
            ctx.block_tables = device_tensor([t + [0] * (width - len(t)) for t in tables], dev, torch.int32)
        if triton_prefill:
            cu = [0]
            for n in query_lens:
                cu.append(cu[-1] + n)
            ctx.cu_query_lens = device_tensor(cu, dev, torch.int32)
            ctx.context_lens = device_tensor(context_lens, dev, torch.int32)
            ctx.max_query_len = max(query_lens)
        return ctx

    # -- decode ------------------------------------------------------------------------------------
    def graphed(self, n: int) -> bool:
        return self.graphs is not None and n <= self.graphs.max_bs

    def _run_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        self.decode_inputs.prepare(batch.seqs, self.graphs.bucket_of[n] if self.graphed(n) else n)
        return self.decode_forward(n)

    def decode_forward(self, n: int) -> torch.Tensor:
        """Logits [n, vocab] (fp32) of the decode inputs now in the device buffers."""
        if self.graphed(n):
            return self.graphs.forward(n)
        return self.eager_decode_forward(n)

    def eager_decode_forward(self, n: int, verify_query_len: int = 0,
                             hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """decode_forward without graphs (pseudo-rows of sequences of ``verify_query_len`` tokens:
        multi-query attention); ``hidden``: (logits, the final hidden states they came from)."""
        ids, positions, ctx = self.decode_inputs.views(n, verify_query_len)
        set_context(ctx)
        states = self.model(ids, positions)
        reset_context()
        logits = self.model.compute_logits(states).float()
        return (logits, states) if hidden else logits

    def decode_steps(self, seqs: list[Sequence], steps: int) -> list[list[int]]:
        """``steps`` greedy decode steps back to back on the device; per sequence its tokens in step
        order. The caller gave every sequence blocks for all the steps, and kept every position
        below max_model_len. Nothing waits for the device until the tokens come back."""
        return self.decode_inputs.fetch_tokens(self.decode_steps_on_device(seqs, steps))

    def decode_steps_on_device(self, seqs: list[Sequence], steps: int) -> torch.Tensor:
        """decode_steps' tokens left on the device: [steps, len(seqs)], valid until the next
        multi-step decode of this runner."""
        inputs = self.decode_inputs
        n = len(seqs)
        graphed = self.graphed(n)
        rows = self.graphs.bucket_of[n] if graphed else n
        inputs.prepare(seqs, rows)
        out = inputs.step_tokens(steps, rows)
        for _ in range(steps):
            if graphed:
                self.graphs.step(rows)  # forward, argmax, next inputs
            else:
                inputs.advance(self.decode_forward(n), rows, out)
        return out[:, :n]
