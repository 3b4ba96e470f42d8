"""Rotary embedding of q and k fused with the KV-cache store: one launch per layer instead of
a dozen elementwise ops plus a store.

q is rotated in place; k is rotated and written, with v, straight into the cache slots (the
rotated k is not needed anywhere else). neox layout: the two halves of each head are the pairs.
cos/sin tables are fp32 [max_position, head_dim] as built by transformers (cat(freqs, freqs)).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton
from kernels.kv_store import store_kv_ref


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos + rot * sin


def rope_store_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_table: torch.Tensor, sin_table: torch.Tensor,
    k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, slot_mapping: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k/v: [T, Hkv, D]. Returns rotated (q, k), in the input dtype as transformers
    computes them (tables cast to the activation dtype first); stores k, v if a cache is given."""
    cos = cos_table[positions].to(q.dtype).unsqueeze(1)
    sin = sin_table[positions].to(q.dtype).unsqueeze(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if k_cache is not None and k_cache.numel():
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k


if HAS_TRITON:

    @triton.jit
    def _rope_store_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        q_stride, k_stride, v_stride,
        QH: tl.constexpr, KH: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr, STORE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        d_mask = d < HALF
        cos = tl.load(cos_ptr + pos * 2 * HALF + d, mask=d_mask, other=0.0)
        sin = tl.load(sin_ptr + pos * 2 * HALF + d, mask=d_mask, other=0.0)

        hq = tl.arange(0, QH_PAD)
        qm = (hq[:, None] < QH) & d_mask[None, :]
        q_off = q_ptr + t * q_stride + hq[:, None] * (2 * HALF) + d[None, :]
        q1 = tl.load(q_off, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_off + HALF, mask=qm, other=0.0).to(tl.float32)
        tl.store(q_off, (q1 * cos[None, :] - q2 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=qm)
        tl.store(q_off + HALF, (q2 * cos[None, :] + q1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=qm)

        hk = tl.arange(0, KH_PAD)
        km = (hk[:, None] < KH) & d_mask[None, :]
        k_off = k_ptr + t * k_stride + hk[:, None] * (2 * HALF) + d[None, :]
        k1 = tl.load(k_off, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(k_off + HALF, mask=km, other=0.0).to(tl.float32)
        r1 = (k1 * cos[None, :] - k2 * sin[None, :]).to(k_ptr.dtype.element_ty)
        r2 = (k2 * cos[None, :] + k1 * sin[None, :]).to(k_ptr.dtype.element_ty)
        tl.store(k_off, r1, mask=km)
        tl.store(k_off + HALF, r2, mask=km)
        if STORE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                c_off = slot * (KH * 2 * HALF) + hk[:, None] * (2 * HALF) + d[None, :]
                tl.store(k_cache_ptr + c_off, r1, mask=km)
                tl.store(k_cache_ptr + c_off + HALF, r2, mask=km)
                v_off = v_ptr + t * v_stride + hk[:, None] * (2 * HALF) + d[None, :]
                tl.store(v_cache_ptr + c_off, tl.load(v_off, mask=km), mask=km)
                tl.store(v_cache_ptr + c_off + HALF, tl.load(v_off + HALF, mask=km), mask=km)


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_table: torch.Tensor, sin_table: torch.Tensor,
    k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, slot_mapping: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rope_store_ref: rotates q and k in place (their rows may be strided views
    of the fused qkv output) and stores k, v. Rounds once from fp32, so bf16 results can differ from
    the reference by one ulp."""
    tokens, qh, dim = q.shape
    kh = k.shape[1]
    assert dim % 2 == 0 and q.stride(1) == dim and k.stride(1) == dim and v.stride(1) == dim
    store = k_cache is not None and k_cache.numel() > 0
    if tokens:
        _rope_store_kernel[(tokens,)](
            q, k, v, positions, cos_table, sin_table,
            k_cache if store else q, v_cache if store else q, slot_mapping if store else positions,
            q.stride(0), k.stride(0), v.stride(0),
            QH=qh, KH=kh, QH_PAD=next_pow2(qh), KH_PAD=next_pow2(kh),
            HALF=dim // 2, HALF_PAD=next_pow2(dim // 2), STORE=store,
        )
    return q, k
