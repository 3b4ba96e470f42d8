"""Attention over the paged KV cache; reads the step's metadata from engine.context.

Prefill: new K/V are stored in the cache first, then each sequence attends to its whole context
with torch SDPA (causal; a chunk or a prefix-cache hit gathers the earlier K/V from the cache).
Decode: one token per sequence, paged decode attention (Triton on GPU, the torch reference on CPU).
Speculative verify (``Context.verify_query_len``): k + 1 tokens per sequence, multi-query paged decode
attention (kernels/verify_attention.py), whether the rest of the forward runs as prefill or as decode pseudo-rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context
from engine.layers.options import ModelOptions
# Module references, not function imports: tests may reload these modules to switch Triton
# between compiled and interpreted mode.
from kernels import kv_store, paged_attention, prefill_attention, verify_attention


# Minimum tokens per flash-decoding partition: small enough that a batch-1 decode over a few
# hundred tokens still spreads over many SMs.
DECODE_PARTITION = 128


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 options: ModelOptions = ModelOptions()) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.use_triton, self.pdl, self.block_size = options.use_triton, options.pdl, options.block_size
        self.max_model_len = options.max_model_len
        self.batch_invariant = options.batch_invariant
        # Set by the model runner once the pool is allocated: [num_blocks, block_size, kv_heads, head_dim].
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)
        self._splits: dict[int, int] = {}  # decode batch size -> split count

    def decode_splits(self, batch: int) -> int:
        """Flash-decoding partitions of a decode over ``batch`` sequences. A function of the batch
        size alone, so a CUDA graph captured for a bucket and an eager step of that size agree. In
        batch-invariant mode batch 1's at every batch: a query's context is cut into the same
        partitions, merged in the same order, in a decode step and in a verify's pseudo-rows."""
        batch = 1 if self.batch_invariant else batch
        splits = self._splits.get(batch)
        if splits is None:
            splits = self._splits[batch] = paged_attention.choose_num_splits(
                batch, self.num_kv_heads, self.max_model_len, DECODE_PARTITION)
        return splits

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, kv_stored: bool = False
    ) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads * dim].
        ``kv_stored``: the caller already wrote k, v into the cache (fused rotary + store); a
        decode step then reads them from there only, and k, v may be None."""
        ctx = get_context()
        if self.k_cache.numel() and not kv_stored:
            (kv_store.store_kv if self.use_triton else kv_store.store_kv_ref)(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.verify_query_len and self.k_cache.numel():
            out = self._verify(q, ctx)
        elif ctx.is_prefill and ctx.cu_query_lens is not None and self.k_cache.numel():
            out = prefill_attention.paged_prefill_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_query_lens, ctx.context_lens,
                ctx.max_query_len, self.scale,
            )
        elif ctx.is_prefill:
            out = self._prefill(q, k, v, ctx)
        elif self.use_triton:
            # Batch-invariant mode launches it without PDL: with PDL the kernel reads every position
            # but a row's newest before waiting for the qkv launch, and a verify's pseudo-rows read
            # positions that launch wrote for the rows before them (the same binary for decode and
            # verify either way: PDL off for both).
            out = paged_attention.paged_decode_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale,
                num_splits=self.decode_splits(q.shape[0]), partition=DECODE_PARTITION,
                pdl=self.pdl and not self.batch_invariant, first_new=ctx.first_new,
            )
        else:
            out = paged_attention.paged_decode_attention_ref(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _verify(self, q: torch.Tensor, ctx) -> torch.Tensor:
        """Each sequence's verify tokens against its context, its K/V read once per KV head."""
        q_len = ctx.verify_query_len
        if ctx.is_prefill:  # one entry per sequence, its queries at cu_query_lens
            tables, lens, cu = ctx.block_tables, ctx.context_lens, ctx.cu_query_lens
        else:  # pseudo-rows, q_len a sequence: its table (every row holds it) and its last row's length
            rows = q.shape[0] // q_len * q_len
            tables, lens, cu = ctx.block_tables[:rows:q_len], ctx.context_lens[q_len - 1 : rows : q_len], None
        if not self.use_triton:
            return verify_attention.paged_verify_attention_ref(q, self.k_cache, self.v_cache, tables, lens, self.scale,
                                                               q_len, cu)
        return verify_attention.paged_verify_attention(
            q, self.k_cache, self.v_cache, tables, lens, self.scale, q_len, cu,
            num_splits=self.decode_splits(lens.shape[0]), partition=DECODE_PARTITION, pdl=self.pdl,
        )

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(ctx.query_lens, ctx.context_lens_host)):
            qi = q[start : start + q_len].transpose(0, 1)  # [heads, q_len, dim]
            if ctx_len == q_len:
                ki = k[start : start + q_len].transpose(0, 1)
                vi = v[start : start + q_len].transpose(0, 1)
                mask = None
            else:  # earlier tokens of this sequence are in the cache: gather the whole context
                table = ctx.block_tables[i]
                pos = torch.arange(ctx_len, device=q.device)
                slots = table[pos // self.block_size].long() * self.block_size + pos % self.block_size
                kv_width = self.num_kv_heads * self.head_dim
                ki = self.k_cache.view(-1, kv_width)[slots].view(ctx_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
                vi = self.v_cache.view(-1, kv_width)[slots].view(ctx_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
                # Query j sits at position ctx_len - q_len + j: causal mask aligned bottom-right.
                # Imported here: torch.nn.attention.bias imports torch._dynamo (~2 s on a CPU), which a
                # process that never attends to cached context (a server starting, a TP worker's
                # decode) otherwise never loads.
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(q_len, ctx_len)
            if group > 1:
                # Expanded K/V rather than enable_gqa: GQA is not supported by every fused SDPA
                # backend (memory-efficient attention lacks it and would fall back to math).
                # expand + reshape, not repeat_interleave, which syncs with the GPU to size its output.
                kv_shape = (self.num_heads, ki.shape[1], self.head_dim)
                ki = ki[:, None].expand(self.num_kv_heads, group, *ki.shape[1:]).reshape(kv_shape)
                vi = vi[:, None].expand(self.num_kv_heads, group, *vi.shape[1:]).reshape(kv_shape)
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=self.scale,
            )
            out[start : start + q_len] = oi[0].transpose(0, 1)
            start += q_len
        return out
