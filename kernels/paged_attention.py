"""Decode attention over a paged KV cache: one new query token per sequence.

GQA-aware: one program handles one KV head and all the query heads of its group, so each K/V
element is read from memory once per group (not once per query head). The group's queries are a
[G, head_dim] tile (padded to 16 rows for tl.dot). Long contexts are split into partitions
processed by separate programs (flash-decoding), so that small batches with few KV heads still
fill the GPU; with one partition each program writes its output directly.

Split partials are merged in the same launch (no second reduce kernel: at batch 1 its launch and
gap cost about as much as the merge itself): every split program writes its partial, then takes a
ticket from an atomic counter per (sequence, KV head); the program that draws the last ticket
knows all the others' partials are written (acq_rel atomics, after a barrier over the program's
own stores), merges them and resets the counter to zero, so the next launch or CUDA-graph replay
starts from zero again without a memset.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import HAS_TRITON, next_pow2, pdl_launch_args, tl, triton
from kernels.paged_tiles import attend_tile, load_first_kv_tile, load_kv_tile


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [batch, q_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim];
    block_tables: [batch, max_blocks] int; context_lens: [batch] int. Returns [batch, q_heads, head_dim]."""
    batch, q_heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    tables = block_tables.clamp(min=0).long()
    if not q.is_cuda and batch:  # the engine's CPU path: the tables span max_model_len (4,096 positions for
        # SmolLM2), the contexts a few hundred; no graph to keep static and no device to sync: read the
        # blocks of the longest context only (the rest are masked out below either way).
        tables = tables[:, : max(1, -(-int(context_lens.max()) // block_size))]
    max_blocks = tables.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k_cache[tables].reshape(batch, max_blocks * block_size, kv_heads, dim).to(acc)
    v = v_cache[tables].reshape(batch, max_blocks * block_size, kv_heads, dim).to(acc)
    k = k.repeat_interleave(group, dim=2)  # [batch, ctx, q_heads, dim]
    v = v.repeat_interleave(group, dim=2)
    pos = torch.arange(max_blocks * block_size, device=q.device)
    invalid = pos[None, :] >= context_lens[:, None].to(q.device)  # [batch, ctx]
    # Slots past a sequence's context hold whatever was there (maybe NaN): zero them, not just mask.
    k = k.masked_fill(invalid[:, :, None, None], 0.0)
    v = v.masked_fill(invalid[:, :, None, None], 0.0)
    scores = torch.einsum("bhd,bthd->bht", q.to(acc), k) * scale
    scores = scores.masked_fill(invalid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,bthd->bhd", probs, v).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, first_new_ptr,
        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counter_ptr,
        scale_log2, q_stride_b, q_stride_h, out_stride_b, out_stride_h, bt_stride,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, G_MERGE: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr, HAS_FIRST_NEW: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # The context lengths and block tables were written before the forward began; only q and
        # the K/V of the row's newest token (from first_new on: a verify's pseudo-rows, whose
        # sequence's earlier rows this forward stored too) come from the kernel just before this one
        # (qkv + rope + store).
        ctx_len = tl.load(context_lens_ptr + b)
        start = split * PARTITION
        end = tl.minimum(start + PARTITION, ctx_len)
        if HAS_FIRST_NEW:
            newest = tl.load(first_new_ptr + b).to(tl.int32)
        else:
            newest = ctx_len - 1
        table = block_tables_ptr + b * bt_stride
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        # The first tile: the newest token (the one new position) read after waiting on that kernel.
        n = start + tl.arange(0, BLOCK_N)
        k, v = load_first_kv_tile(k_cache_ptr, v_cache_ptr, table, n, end, newest, kvh, d, d_mask,
                                  KV_HEADS, HEAD_DIM, BLOCK_SIZE, PDL)

        g = tl.arange(0, G_PAD)
        g_mask = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
            mask=g_mask[:, None] & d_mask[None, :], other=0.0,
        )
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        m, l, acc = attend_tile(q, k, v, (n < end)[None, :], m, l, acc, scale_log2, IEEE)
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kvh, d, d_mask, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
            m, l, acc = attend_tile(q, k, v, n_mask[None, :], m, l, acc, scale_log2, IEEE)

        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(
                out_ptr + b * out_stride_b + heads[:, None] * out_stride_h + d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :],
            )
        else:
            # Partials laid out [batch, q_heads, NUM_SPLITS, (D_PAD)].
            base = (b * KV_HEADS * GROUP + heads) * NUM_SPLITS
            tl.store(part_acc_ptr + (base + split)[:, None] * D_PAD + d[None, :], acc, mask=g_mask[:, None])
            tl.store(part_m_ptr + base + split, m, mask=g_mask)
            tl.store(part_l_ptr + base + split, l, mask=g_mask)
            # Every thread's stores are issued before the ticket's release (thread 0 takes it).
            tl.debug_barrier()
            counter = counter_ptr + b * KV_HEADS + kvh
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == NUM_SPLITS - 1:  # the other splits are done: their partials are visible
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch; ends with this kernel
                gm = tl.arange(0, G_MERGE)
                _merge_group(
                    out_ptr + b * out_stride_b + (kvh * GROUP + gm) * out_stride_h, part_acc_ptr, part_m_ptr,
                    part_l_ptr, (b * KV_HEADS * GROUP + kvh * GROUP + gm) * NUM_SPLITS, gm < GROUP, d, d_mask,
                    NUM_SPLITS, S_PAD, D_PAD,
                )

    @triton.jit
    def _merge_group(
        out_ptrs, part_acc_ptr, part_m_ptr, part_l_ptr, base, g_mask, d, d_mask,
        NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):
        """The group's heads' outputs from their NUM_SPLITS partials each (``base``: each head's split 0),
        all loaded at once: one round trip for the whole group. (A loop over the heads paid one each,
        since a head's store may alias the next head's loads: a one-KV-head model's 9 heads made its
        decode attention 35% slower than three KV heads' 3.) out = sum_s acc_s w_s / sum_s l_s w_s,
        w_s = 2^(m_s - max m); empty partitions (m = -inf) weigh nothing. .cg loads: from L2, where the
        other programs' stores went, never a stale L1 line."""
        s = tl.arange(0, S_PAD)
        gs_mask = g_mask[:, None] & (s < NUM_SPLITS)[None, :]
        gs = base[:, None] + s[None, :]
        m = tl.load(part_m_ptr + gs, mask=gs_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_l_ptr + gs, mask=gs_mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + gs[:, :, None] * D_PAD + d[None, None, :], mask=gs_mask[:, :, None],
                      other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, 1)
        w = tl.where(gs_mask & (m > float("-inf")), tl.exp2(m - m_max[:, None]), 0.0)
        out = tl.sum(acc * w[:, :, None], 1) / tl.sum(l * w, 1)[:, None]
        tl.store(out_ptrs[:, None] + d[None, :], out.to(out_ptrs.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MIN_COUNTERS = 1 << 16  # batch x KV heads covered by the first allocation (256 KB of int32)


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The split-merge tickets, one int32 per (sequence, KV head), zero between launches: each
    launch's merging programs reset theirs. One buffer per device, shared by all layers, which is
    safe as long as decode launches run one after another (one stream, as the engine does). Made
    on the first decode (the engine's eager warm-up precedes every graph capture); a bigger batch
    during a capture cannot grow it, since memory allocated there belongs to the graph."""
    device = torch.device(device)
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        assert device.type != "cuda" or not torch.cuda.is_current_stream_capturing(), (
            "paged decode: split counters must be allocated before CUDA-graph capture (run one eager step first)")
        counters = _COUNTERS[device] = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
    return counters


def choose_num_splits(batch: int, kv_heads: int, max_context: int, partition: int, num_sms: int = 132) -> int:
    """Split the context only when batch * kv_heads programs would leave most of the GPU idle."""
    max_splits = max(1, math.ceil(max_context / partition))
    programs = batch * kv_heads
    if programs >= num_sms:
        return 1
    return max(1, min(max_splits, math.ceil(2 * num_sms / programs)))


def split_partition(table_tokens: int, num_splits: int, partition: int | None, block_n: int) -> int:
    """Tokens per partition: at least ``partition`` (default 512), a multiple of ``block_n``, and
    enough for ``num_splits`` of them to cover the widest block table, whatever split count was asked for."""
    partition = max(partition or 512, math.ceil(table_tokens / num_splits))
    return max(block_n, (partition + block_n - 1) // block_n * block_n)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    partition: int | None = None,
    out: torch.Tensor | None = None,
    pdl: bool = True,
    first_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_decode_attention_ref. The context is cut into ``num_splits``
    partitions of at least ``partition`` tokens (grown so that they cover the block table's width);
    CUDA graphs need the split count fixed per batch size, so the caller chooses it. ``pdl``:
    programmatic dependent launch wherever the GPU has it. The newest token of each
    sequence may come from the kernel just before (it waits for that one); older ones may not,
    except from ``first_new`` [batch] on (int64 positions; None: the newest only): a verify's
    pseudo-rows, whose earlier rows of the same sequence were stored by that kernel too. Positions
    read before the wait are read before that kernel has stored them."""
    batch, q_heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    assert q_heads == group * kv_heads and q.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    block_n = 64 if dim <= 128 else 32
    partition = split_partition(block_tables.shape[1] * block_size, num_splits, partition, block_n)
    d_pad = max(16, next_pow2(dim))
    if num_splits > 1:
        part_acc = torch.empty(batch, q_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_m = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, batch * kv_heads)
    else:
        part_acc = part_m = part_l = counters = out  # unused
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if first_new is None else first_new,
        out, part_acc, part_m, part_l, counters,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, G_PAD=max(16, next_pow2(group)), G_MERGE=next_pow2(group),
        HEAD_DIM=dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, PARTITION=partition, NUM_SPLITS=num_splits, S_PAD=max(2, next_pow2(num_splits)),
        IEEE=q.dtype == torch.float32, HAS_FIRST_NEW=first_new is not None, **pdl_launch_args(pdl, q.device),
        num_warps=4, num_stages=2,
    )
    return out
