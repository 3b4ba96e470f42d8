"""Triton varlen paged prefill attention against its torch reference (and the reference vs SDPA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(q_lens, ctx_lens, q_heads, kv_heads, dim, block_size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    max_blocks = max(math.ceil(c / block_size) for c in ctx_lens)
    num_blocks = batch * max_blocks + 2
    q = torch.randn(sum(q_lens), q_heads, dim, generator=g).to(device, dtype)
    kc = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    vc = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks).to(device, torch.int32)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return q, kc, vc, tables, cu, torch.tensor(ctx_lens, dtype=torch.int32, device=device)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_reference_is_causal_sdpa_when_nothing_is_cached():
    q_lens = [5, 9]
    q, kc, vc, tables, _, _ = _case(q_lens, q_lens, 4, 2, 16, 4, torch.float64, "cpu")
    out = paged_prefill_attention_ref(q, kc, vc, tables, q_lens, q_lens, 0.25)
    start = 0
    for b, n in enumerate(q_lens):
        pos = torch.arange(n)
        slots = tables[b, pos // 4].long() * 4 + pos % 4
        k = kc.view(-1, 2, 16)[slots].transpose(0, 1)
        v = vc.view(-1, 2, 16)[slots].transpose(0, 1)
        dense = F.scaled_dot_product_attention(q[start : start + n].transpose(0, 1), k, v, is_causal=True,
                                               scale=0.25, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(out[start : start + n], dense, atol=1e-10)
        start += n


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(4, 2, 16), (4, 4, 32), (6, 1, 24)])
def test_triton_matches_reference_small(q_heads, kv_heads, dim):
    # A whole prompt, a later chunk after cached tokens, a single token, a chunk longer than a tile.
    q_lens, ctx_lens = [7, 5, 1, 70], [7, 40, 13, 70]
    q, kc, vc, tables, cu, ctx = _case(q_lens, ctx_lens, q_heads, kv_heads, dim, 4, torch.float32, DEVICE, seed=dim)
    ref = paged_prefill_attention_ref(q, kc, vc, tables, q_lens, ctx_lens, dim**-0.5)
    out = paged_prefill_attention(q, kc, vc, tables, cu, ctx, max(q_lens), dim**-0.5)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(32, 4, 64), (32, 32, 128), (9, 3, 64)])
def test_triton_matches_reference_gpu(q_heads, kv_heads, dim):
    g = torch.Generator().manual_seed(dim)
    q_lens = torch.randint(1, 1100, (12,), generator=g).tolist()
    ctx_lens = [n + int(torch.randint(0, 600, (1,), generator=g)) for n in q_lens]
    q, kc, vc, tables, cu, ctx = _case(q_lens, ctx_lens, q_heads, kv_heads, dim, 16, torch.bfloat16, "cuda", seed=dim)
    ref = paged_prefill_attention_ref(q, kc, vc, tables, q_lens, ctx_lens, dim**-0.5)
    out = paged_prefill_attention(q, kc, vc, tables, cu, ctx, max(q_lens), dim**-0.5)
    assert _rel(out, ref) < 1e-2
