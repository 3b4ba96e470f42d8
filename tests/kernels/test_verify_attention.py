"""Triton multi-query paged decode attention (the speculative verify's) against its torch
reference, in both query layouts, and against the decode kernel at one query per sequence."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.paged_attention import paged_decode_attention, split_counters
from kernels.verify_attention import paged_verify_attention, paged_verify_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(lens, kv_heads, dim, block_size, g, dtype=torch.float32):
    max_blocks = max(math.ceil(n / block_size) for n in lens) + 1
    num_blocks = len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    return k_cache, v_cache, tables.to(DEVICE, torch.int32)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [  # (q_heads, kv_heads, dim): MHA, GQA 4, GQA 8, MQA; head_dim 64 and 128
    (4, 4, 64), (8, 2, 128), (8, 1, 64), (16, 2, 64),
]


@pytest.mark.parametrize("q_heads,kv_heads,dim", CASES)
@pytest.mark.parametrize("q_len", [1, 2, 3, 5, 7, 9])
@pytest.mark.parametrize("splits,block_size", [(1, 16), (3, 32), (4, 16)])
def test_fixed_layout_matches_reference(q_heads, kv_heads, dim, q_len, splits, block_size):
    """q_len rows per sequence back to back, ragged contexts (one of them just the queries), two
    padding rows after the sequences, which stay as they were."""
    g = torch.Generator().manual_seed(q_len * 100 + dim + splits)
    lens = [q_len, q_len + 37, 150, q_len + 5]
    k_cache, v_cache, tables = _cache(lens, kv_heads, dim, block_size, g)
    rows = len(lens) * q_len + 2
    q = torch.randn(rows, q_heads, dim, generator=g).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_verify_attention_ref(q, k_cache, v_cache, tables, context_lens, dim**-0.5, q_len)
    out = torch.full_like(q, float("nan"))  # poison: every query row must be written
    paged_verify_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5, q_len, num_splits=splits,
                           partition=32, out=out)
    n = len(lens) * q_len
    assert not out[:n].isnan().any() and out[n:].isnan().all()
    assert ref[:n].abs().max() > 0.1
    assert _rel(out[:n], ref[:n]) < 1e-5


@pytest.mark.parametrize("q_heads,kv_heads,dim", CASES)
@pytest.mark.parametrize("splits", [1, 5])
def test_varlen_layout_matches_reference(q_heads, kv_heads, dim, splits):
    """Query lengths up to Q_LEN = 5 per sequence (cu_query_lens), one padding sequence with no
    queries (a CUDA graph's), contexts across block boundaries; run twice, so that the split
    tickets were reset by the first launch."""
    g = torch.Generator().manual_seed(dim + splits)
    query_lens, lens = [5, 2, 0, 1, 4], [5, 70, 1, 129, 33]
    k_cache, v_cache, tables = _cache(lens, kv_heads, dim, 16, g)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]) + 3, q_heads, dim, generator=g).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_verify_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.2, 5, cu)
    for _ in range(2):
        out = paged_verify_attention(q, k_cache, v_cache, tables, context_lens, 0.2, 5, cu, num_splits=splits,
                                     partition=32)
        assert _rel(out[: int(cu[-1])], ref[: int(cu[-1])]) < 1e-5
    assert split_counters(q.device, 1)[: len(lens) * kv_heads].eq(0).all()


def test_strided_sequence_views_of_pseudo_rows():
    """The decode pseudo-row layout: every row holds its sequence's table and its own context
    length; the sequences are every q_len-th table row and every q_len-th length from the last."""
    g = torch.Generator().manual_seed(7)
    q_len, lens = 4, [9, 40]
    k_cache, v_cache, tables = _cache(lens, 2, 64, 16, g)
    row_tables = tables.repeat_interleave(q_len, 0)
    row_lens = torch.tensor([n - q_len + 1 + j for n in lens for j in range(q_len)], dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens) * q_len, 8, 64, generator=g).to(DEVICE)
    seq_tables, seq_lens = row_tables[::q_len], row_lens[q_len - 1 :: q_len]
    ref = paged_verify_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens, device=DEVICE), 0.125, q_len)
    out = paged_verify_attention(q, k_cache, v_cache, seq_tables, seq_lens, 0.125, q_len, num_splits=2, partition=16)
    assert _rel(out, ref) < 1e-5
    # Every row is a one-token decode at its own length: the decode kernel's answer.
    decode = paged_decode_attention(q, k_cache, v_cache, row_tables, row_lens, 0.125)
    assert _rel(out, decode) < 1e-5


@pytest.mark.parametrize("q_heads,kv_heads,splits", [(8, 8, 1), (8, 2, 3), (8, 1, 4)])
def test_one_query_equals_the_decode_kernel(q_heads, kv_heads, splits):
    g = torch.Generator().manual_seed(splits)
    lens = [1, 17, 100]
    k_cache, v_cache, tables = _cache(lens, kv_heads, 64, 16, g)
    q = torch.randn(len(lens), q_heads, 64, generator=g).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    decode = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125, num_splits=splits, partition=32)
    verify = paged_verify_attention(q, k_cache, v_cache, tables, context_lens, 0.125, 1, num_splits=splits,
                                    partition=32)
    torch.testing.assert_close(verify, decode, rtol=1e-6, atol=1e-6)  # bitwise in the interpreter; merge order may differ on GPU


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads,kv_heads,splits", [(32, 32, 9), (32, 8, 4), (32, 32, 1)])  # Llama-2-7B, Llama-3-8B
def test_bf16_gpu(q_heads, kv_heads, splits):
    """On the GPU only: the interpreter's bf16 tl.dot is wrong (the decode kernel's too)."""
    g = torch.Generator().manual_seed(splits)
    lens = [2048, 517]
    k_cache, v_cache, tables = _cache(lens, kv_heads, 128, 16, g, torch.bfloat16)
    q = torch.randn(10, q_heads, 128, generator=g).to(DEVICE, torch.bfloat16)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_verify_attention_ref(q, k_cache, v_cache, tables, context_lens, 128**-0.5, 5)
    for _ in range(2):  # the second launch starts from the tickets the first one reset
        out = paged_verify_attention(q, k_cache, v_cache, tables, context_lens, 128**-0.5, 5, num_splits=splits,
                                     partition=128)
        assert _rel(out, ref) < 2e-2
