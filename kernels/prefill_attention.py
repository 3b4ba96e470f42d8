"""Varlen causal prefill attention that reads K/V from the paged cache: one launch per layer for a
whole batch of prompt chunks, whatever part of each context is cached (prefix hits, earlier chunks).

The step's new K/V must already be in the cache. Query token i of sequence b sits at position
ctx_len[b] - q_len[b] + i and attends to cache positions 0..itself. One program handles BLOCK_M
queries of one head: a [BLOCK_M, D] tile against [BLOCK_N, D] K/V tiles gathered through the block
table, online softmax in fp32 (the tile step is kernels/paged_tiles.py's, shared with decode).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton
from kernels.paged_tiles import attend_tile, load_kv_tile


def paged_prefill_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_lens: list[int], context_lens: list[int], scale: float,
) -> torch.Tensor:
    """q: [tokens, q_heads, dim] (sequences back to back); returns the same shape."""
    _, block_size, kv_heads, dim = k_cache.shape
    group = q.shape[1] // kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(ctx_len, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache.view(-1, kv_heads, dim)[slots].to(acc).repeat_interleave(group, dim=1)  # [ctx, heads, dim]
        v = v_cache.view(-1, kv_heads, dim)[slots].to(acc).repeat_interleave(group, dim=1)
        qi = q[start : start + q_len].to(acc)
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        start += q_len
    return out


if HAS_TRITON:

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_q_ptr, ctx_lens_ptr, out_ptr,
        scale_log2, q_stride_t, q_stride_h, out_stride_t, out_stride_h, bt_stride,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        m_block = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        if m_block * BLOCK_M >= q_len:
            return
        ctx_len = tl.load(ctx_lens_ptr + b)
        offset = ctx_len - q_len  # position of the chunk's first query
        kvh = h // GROUP

        m_idx = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m_idx < q_len
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        rows = (q_start + m_idx).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        qpos = offset + m_idx

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        end = tl.minimum(ctx_len, offset + (m_block + 1) * BLOCK_M)  # last query of this tile, +1
        table = block_tables_ptr + b * bt_stride
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kvh, d, d_mask, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
            visible = (n[None, :] <= qpos[:, None]) & n_mask[None, :]
            m, l, acc = attend_tile(q, k, v, visible, m, l, acc, scale_log2, IEEE)
        out = acc / l[:, None]
        tl.store(out_ptr + rows[:, None] * out_stride_t + h * out_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
) -> torch.Tensor:
    """Triton version of paged_prefill_attention_ref. cu_query_lens: [batch + 1] int32 prefix sums
    of the chunk lengths; context_lens: [batch] int32 (cached + new tokens)."""
    tokens, q_heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty(tokens, q_heads, dim, dtype=q.dtype, device=q.device)
    batch = context_lens.shape[0]
    block_m = 64 if dim <= 64 else 32
    block_n = 64
    grid = (triton.cdiv(max_query_len, block_m), batch, q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, out,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=q_heads // kv_heads, HEAD_DIM=dim, D_PAD=max(16, next_pow2(dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
