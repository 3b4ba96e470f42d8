"""Multi-query paged decode attention: a speculative verify's k + 1 query tokens per sequence.

Each sequence's queries are the last q_len positions of its context, causal among themselves:
query i sees the keys at positions <= ctx_len - q_len + i. Like the decode kernel
(kernels/paged_attention.py), one program handles one KV head of one sequence, with all its query
rows in one tile: the Q_LEN x GROUP (query token, head of the group) rows, padded to 16 for tl.dot,
so each K/V element is read once for all the verify tokens and heads of its group (the varlen
prefill kernel reads it once per query head; decode pseudo-rows once per token). Long contexts are
split into partitions (flash-decoding) merged in the same launch by the last split program, which
draws the last ticket of the (sequence, KV head) counter (see paged_attention.py for the protocol).

Two query layouts:
- varlen (``cu_query_lens`` given): sequence b's queries are rows cu[b]..cu[b + 1] of q, at most
  Q_LEN of them (the prefill-graph verify path; a sequence of 0 queries is a graph's padding);
- fixed: Q_LEN rows per sequence, back to back (decode pseudo-rows grouped by sequence; rows past
  batch * Q_LEN are padding and are not written).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, pdl_launch_args, tl, triton
from kernels.paged_attention import split_counters, split_partition
from kernels.paged_tiles import attend_tile, load_first_kv_tile, load_kv_tile
from kernels.prefill_attention import paged_prefill_attention_ref


def paged_verify_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, q_len: int, cu_query_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [rows, q_heads, dim]; block_tables: [batch, max_blocks]; context_lens: [batch] (views with
    any strides). Returns [rows, q_heads, dim]; rows that belong to no sequence are zeros."""
    batch = context_lens.shape[0]
    cu = cu_query_lens.tolist() if cu_query_lens is not None else [b * q_len for b in range(batch + 1)]
    query_lens = [cu[b + 1] - cu[b] for b in range(batch)]
    assert max(query_lens, default=0) <= q_len, f"a sequence has {max(query_lens)} queries, more than q_len={q_len}"
    out = torch.zeros_like(q)
    out[: cu[-1]] = paged_prefill_attention_ref(q[: cu[-1]], k_cache, v_cache, block_tables, query_lens,
                                                context_lens.tolist(), scale)
    return out


if HAS_TRITON:

    @triton.jit
    def _paged_verify_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counter_ptr,
        scale_log2, q_stride_t, q_stride_h, out_stride_t, out_stride_h, bt_stride, lens_stride,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
        VARLEN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # Lengths, offsets and block tables were written before the forward began; only q and the
        # queries' own K/V (the newest q_len positions) come from the kernel just before this one.
        if VARLEN:
            q_start = tl.load(cu_q_ptr + b)
            q_len = tl.load(cu_q_ptr + b + 1) - q_start
        else:
            q_start = b * Q_LEN
            q_len = Q_LEN
        ctx_len = tl.load(context_lens_ptr + b * lens_stride)
        first_new = ctx_len - q_len  # position of the first query
        start = split * PARTITION
        end = tl.minimum(start + PARTITION, ctx_len)
        table = block_tables_ptr + b * bt_stride
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        # The first tile: the queries' own K/V (from first_new on) read after waiting on that kernel.
        n = start + tl.arange(0, BLOCK_N)
        k, v = load_first_kv_tile(k_cache_ptr, v_cache_ptr, table, n, end, first_new, kvh, d, d_mask,
                                  KV_HEADS, HEAD_DIM, BLOCK_SIZE, PDL)

        r = tl.arange(0, ROWS)  # tile row r: query token r // GROUP, head r % GROUP of the group
        i = r // GROUP
        heads = kvh * GROUP + r % GROUP
        r_mask = (r < Q_LEN * GROUP) & (i < q_len)
        tokens = (q_start + i).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        qpos = first_new + i
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D_PAD], tl.float32)
        m, l, acc = attend_tile(q, k, v, (n[None, :] <= qpos[:, None]) & (n < end)[None, :], m, l, acc,
                                scale_log2, IEEE)
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kvh, d, d_mask, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
            m, l, acc = attend_tile(q, k, v, (n[None, :] <= qpos[:, None]) & n_mask[None, :], m, l, acc,
                                    scale_log2, IEEE)

        out_off = tokens[:, None] * out_stride_t + heads[:, None] * out_stride_h + d[None, :]
        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
        else:
            # Partials laid out [batch, KV_HEADS, ROWS, NUM_SPLITS, (D_PAD)], every tile row.
            base = ((b * KV_HEADS + kvh) * ROWS + r) * NUM_SPLITS
            tl.store(part_acc_ptr + (base + split)[:, None] * D_PAD + d[None, :], acc)
            tl.store(part_m_ptr + base + split, m)
            tl.store(part_l_ptr + base + split, l)
            tl.debug_barrier()  # every thread's stores are issued before the ticket's release
            counter = counter_ptr + b * KV_HEADS + kvh
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == NUM_SPLITS - 1:  # the other splits are done: their partials are visible
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch
                out = _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, base, d, NUM_SPLITS, S_PAD, D_PAD)
                tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, base, d,
                    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr):
        """The tile's rows [ROWS, D_PAD] from their partials (``base``: each row's split 0):
        out = sum_s acc_s w_s / sum_s l_s w_s, w_s = 2^(m_s - max m); empty partitions (m = -inf)
        weigh nothing. .cg loads: from L2, where the other programs' stores went."""
        s = tl.arange(0, S_PAD)
        s_mask = (s < NUM_SPLITS)[None, :]
        m = tl.load(part_m_ptr + base[:, None] + s[None, :], mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_l_ptr + base[:, None] + s[None, :], mask=s_mask, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, 1)
        w = tl.where(s_mask & (m > float("-inf")), tl.exp2(m - m_max[:, None]), 0.0)
        acc = tl.load(part_acc_ptr + base[:, None] * D_PAD + d[None, :], cache_modifier=".cg") * tl.sum(
            tl.where(s[None, :] == 0, w, 0.0), 1)[:, None]
        for split in tl.static_range(1, NUM_SPLITS):  # unrolled: the splits' loads overlap
            w_s = tl.sum(tl.where(s[None, :] == split, w, 0.0), 1)
            part = tl.load(part_acc_ptr + (base + split)[:, None] * D_PAD + d[None, :], cache_modifier=".cg")
            acc += part * w_s[:, None]
        return acc / tl.sum(l * w, 1)[:, None]


def paged_verify_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, q_len: int, cu_query_lens: torch.Tensor | None = None,
    num_splits: int = 1, partition: int | None = None, out: torch.Tensor | None = None, pdl: bool = True,
) -> torch.Tensor:
    """Triton version of paged_verify_attention_ref: q [rows, q_heads, dim], one sequence per entry
    of context_lens (any stride) and row of block_tables; ``q_len``: the most queries a sequence
    has (varlen) or each has (fixed layout). Splits as paged_decode_attention's (fixed per
    captured graph; the counters allocated before capture)."""
    rows, q_heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    batch = context_lens.shape[0]
    assert q_heads == group * kv_heads and q.stride(2) == 1 and q_len >= 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1
    assert cu_query_lens is not None or batch * q_len <= rows, f"{batch} sequences of {q_len} queries > {rows} rows"
    if out is None:
        out = torch.empty_like(q)
    block_n = 64 if dim <= 128 else 32
    partition = split_partition(block_tables.shape[1] * block_size, num_splits, partition, block_n)
    d_pad = max(16, next_pow2(dim))
    tile_rows = max(16, next_pow2(q_len * group))
    if num_splits > 1:
        part_acc = torch.empty(batch, kv_heads, tile_rows, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_m = torch.empty(batch, kv_heads, tile_rows, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        counters = split_counters(q.device, batch * kv_heads)
    else:
        part_acc = part_m = part_l = counters = out  # unused
    _paged_verify_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, cu_query_lens if cu_query_lens is not None else context_lens,
        out, part_acc, part_m, part_l, counters,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        context_lens.stride(0),
        KV_HEADS=kv_heads, GROUP=group, Q_LEN=q_len, ROWS=tile_rows, HEAD_DIM=dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION=partition, NUM_SPLITS=num_splits,
        S_PAD=max(2, next_pow2(num_splits)), VARLEN=cu_query_lens is not None, IEEE=q.dtype == torch.float32,
        **pdl_launch_args(pdl, q.device), num_warps=4 if tile_rows <= 32 else 8, num_stages=2,
    )
    return out
