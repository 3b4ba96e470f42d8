"""Write the new tokens' K and V into their slots of the paged cache.

Cache layout (per layer): [num_blocks, block_size, num_kv_heads, head_dim]; a slot is
block_id * block_size + offset, so the flat view [num_slots, num_kv_heads * head_dim] is indexed by
slot directly. A slot of -1 means "skip" (padding rows of a CUDA-graph batch).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value: [tokens, kv_heads, head_dim]; slot_mapping: [tokens] int."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    width = k_cache.shape[-2] * k_cache.shape[-1]
    k_cache.view(-1, width)[slots] = key[keep].reshape(-1, width).to(k_cache.dtype)
    v_cache.view(-1, width)[slots] = value[keep].reshape(-1, width).to(v_cache.dtype)


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        key_stride, value_stride,
        WIDTH: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            mask = offs < WIDTH
            k = tl.load(key_ptr + t * key_stride + offs, mask=mask)
            v = tl.load(value_ptr + t * value_stride + offs, mask=mask)
            tl.store(k_cache_ptr + slot * WIDTH + offs, k, mask=mask)
            tl.store(v_cache_ptr + slot * WIDTH + offs, v, mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton version of store_kv_ref; key/value may be strided views of a fused qkv output as long
    as each token's [kv_heads, head_dim] is contiguous."""
    tokens, heads, dim = key.shape
    width = heads * dim
    assert key.stride(1) == dim and key.stride(2) == 1 and value.stride(1) == dim and value.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == tokens
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0),
        WIDTH=width, BLOCK=next_pow2(width),
    )
