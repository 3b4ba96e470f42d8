"""Triton KV-slot store against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv, store_kv_ref


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(tokens, num_blocks, block_size, kv_heads, dim, dtype, device, strided=False):
    g = torch.Generator().manual_seed(tokens * 7 + dim)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    if strided:  # k and v as views of a fused qkv projection, as the model passes them
        qkv = torch.randn(tokens, (2 + 2) * kv_heads * dim, generator=g).to(device, dtype)
        _, key, value = qkv.split([2 * kv_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        key, value = key.view(tokens, kv_heads, dim), value.view(tokens, kv_heads, dim)
    else:
        key = torch.randn(tokens, kv_heads, dim, generator=g).to(device, dtype)
        value = torch.randn(tokens, kv_heads, dim, generator=g).to(device, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(device)
    slots[::5] = -1  # padding rows are skipped
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, ref_k, ref_v, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert not torch.equal(ref_k, k_cache.clone().zero_())  # the data is not trivially zero


@pytest.mark.parametrize("kv_heads,dim", [(1, 16), (2, 32), (3, 24)])
@pytest.mark.parametrize("strided", [False, True])
def test_store_matches_reference_small(kv_heads, dim, strided):
    _check(13, 8, 4, kv_heads, dim, torch.float32, DEVICE, strided)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,dim,dtype", [(8, 128, torch.bfloat16), (4, 64, torch.float16), (3, 64, torch.bfloat16)])
def test_store_matches_reference_gpu(kv_heads, dim, dtype):
    _check(4096, 2048, 16, kv_heads, dim, dtype, "cuda", strided=True)
