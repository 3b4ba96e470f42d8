"""The K/V tile loop body shared by the paged attention kernels (decode, verify and varlen prefill).

A tile is BLOCK_N consecutive context positions of one KV head, gathered through a sequence's
block table from the paged cache [num_blocks, block_size, kv_heads, head_dim]; it is folded into
a [rows, D] query tile's online-softmax state (m, l, acc) in fp32, with exp2 and a pre-scaled
log2 softmax scale.
"""

from __future__ import annotations

from kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def kv_tile_offsets(table_ptr, n, n_mask, kvh, d,
                        KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """Element offsets [BLOCK_N, D_PAD] in the caches of context positions n of one sequence
        (table_ptr: its block table row) at KV head kvh."""
        page = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * BLOCK_SIZE + n % BLOCK_SIZE
        return slot[:, None] * (KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]

    @triton.jit
    def load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n, n_mask, kvh, d, d_mask,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """K and V [BLOCK_N, D_PAD] at context positions n; masked positions read as zeros."""
        kv_off = kv_tile_offsets(table_ptr, n, n_mask, kvh, d, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def load_first_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n, end, first_new, kvh, d, d_mask,
                           KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           PDL: tl.constexpr):
        """K and V [BLOCK_N, D_PAD] of a split's first tile, positions n < end. Positions from
        first_new on are this step's own K/V, stored by the kernel just before (qkv + rope + store):
        the older ones are read before waiting on it (PDL), so their latency overlaps its tail, the
        new ones after the wait."""
        kv_off = kv_tile_offsets(table_ptr, n, n < end, kvh, d, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
        is_new = (n >= first_new) & (n < end)
        old_mask = ((n < end) & ~is_new)[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=old_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=old_mask, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        new_mask = is_new[:, None] & d_mask[None, :]
        k = tl.where(new_mask, tl.load(k_cache_ptr + kv_off, mask=new_mask, other=0.0), k)
        v = tl.where(new_mask, tl.load(v_cache_ptr + kv_off, mask=new_mask, other=0.0), v)
        return k, v

    @triton.jit
    def attend_tile(q, k, v, visible, m, l, acc, scale_log2, IEEE: tl.constexpr):
        """Online-softmax step: scores of q [R, D] against k [N, D] where ``visible`` [R, N], then
        (m, l, acc) updated with v [N, D]. A row that has seen nothing visible yet keeps m = -inf
        and l = acc = 0 (exp2(-inf - -inf) is guarded)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc
