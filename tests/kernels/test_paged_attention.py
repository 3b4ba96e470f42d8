"""Triton paged decode attention against its torch reference (and the reference against dense SDPA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.paged_attention import choose_num_splits, paged_decode_attention, paged_decode_attention_ref, split_counters


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch, q_heads, kv_heads, dim, block_size, lens, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(n / block_size) for n in lens) + 1
    num_blocks = batch * max_blocks + 3
    q = torch.randn(batch, q_heads, dim, generator=g).to(device, dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks).to(device, torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, context_lens


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_reference_equals_dense_attention():
    q, kc, vc, tables, lens = _case(3, 4, 2, 16, 4, [1, 7, 13], torch.float64, "cpu")
    out = paged_decode_attention_ref(q, kc, vc, tables, lens, 0.3)
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = tables[b, pos // 4].long() * 4 + pos % 4
        k = kc.view(-1, 2, 16)[slots].transpose(0, 1)
        v = vc.view(-1, 2, 16)[slots].transpose(0, 1)
        dense = F.scaled_dot_product_attention(q[b][:, None], k, v, scale=0.3, enable_gqa=True)[:, 0]
        assert torch.allclose(out[b].double(), dense, atol=1e-10)


def test_cpu_reference_reads_only_the_blocks_of_the_longest_context():
    """The engine's CPU decode path: block tables span max_model_len (256 blocks for SmolLM2's 4,096),
    contexts a few; it gathered and masked every position of every layer, 5x the step time on the real
    teacher. Entries past the longest context are garbage here (out of the pool's range: a gather of
    them would raise) and the result is the one of the clean table."""
    q, kc, vc, tables, lens = _case(3, 4, 2, 16, 4, [1, 7, 13], torch.float32, "cpu")
    padded = torch.cat([tables, torch.full((3, 250), kc.shape[0] + 1000, dtype=tables.dtype)], dim=1)
    assert torch.equal(paged_decode_attention_ref(q, kc, vc, padded, lens, 0.3),
                       paged_decode_attention_ref(q, kc, vc, tables, lens, 0.3))


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(4, 4, 16), (4, 2, 32), (6, 1, 16), (9, 1, 16), (4, 2, 24)])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_matches_reference_small(q_heads, kv_heads, dim, splits):
    lens = [1, 5, 70, 33]
    q, kc, vc, tables, context_lens = _case(4, q_heads, kv_heads, dim, 4, lens, torch.float32, DEVICE, seed=dim)
    ref = paged_decode_attention_ref(q, kc, vc, tables, context_lens, dim**-0.5)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    paged_decode_attention(q, kc, vc, tables, context_lens, dim**-0.5, num_splits=splits, partition=64, out=out)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_first_new_only_moves_reads_after_the_wait(splits):
    """``first_new`` (a verify's pseudo-rows: each row's chunk start) says from which position a row
    reads its K/V after waiting on the kernel before (PDL); the result is the reference's, at a
    first_new anywhere from 0 to the newest position, in the first tile or past it."""
    lens = [1, 5, 70, 33, 64, 12]
    first_new = torch.tensor([0, 2, 66, 0, 63, 11], device=DEVICE)
    q, kc, vc, tables, context_lens = _case(6, 4, 2, 16, 4, lens, torch.float32, DEVICE, seed=splits)
    ref = paged_decode_attention_ref(q, kc, vc, tables, context_lens, 0.25)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kc, vc, tables, context_lens, 0.25, num_splits=splits, partition=16, out=out,
                           first_new=first_new)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("splits", [2, 5])
def test_split_merge_in_one_launch(splits):
    """The last split program of each (sequence, KV head) merges the partials: contexts shorter than
    one partition (the other splits are empty), one spanning every split, GQA group of 3. Run twice:
    the merging programs leave the tickets at zero, so a second launch (a graph replay) is the same."""
    lens = [1, 3, 64, 5 * 16 - 1]
    q, kc, vc, tables, context_lens = _case(4, 6, 2, 16, 4, lens, torch.float32, DEVICE, seed=splits)
    ref = paged_decode_attention_ref(q, kc, vc, tables, context_lens, 0.25)
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, context_lens, 0.25, num_splits=splits, partition=16, out=out)
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-5
        assert not split_counters(q.device, 8)[:8].any()


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 4096, 512) == 1  # the batch fills the GPU already
    assert choose_num_splits(1, 4, 4096, 512) == 8  # capped by the context's partitions
    assert choose_num_splits(1, 4, 4096, 128) == 32
    assert choose_num_splits(16, 3, 4096, 128) == 6
    assert choose_num_splits(1, 4, 300, 512) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("batch,q_heads,kv_heads,dim,block_size", [
    (1, 32, 32, 128, 16),  # Llama-2-7B
    (64, 32, 4, 64, 16),  # TinyLlama
    (16, 9, 3, 64, 16),  # SmolLM2-135M
    (1, 9, 1, 64, 16),  # SmolLM2-135M after the gqa stage's 3 -> 1 (a group of 9, merged in one program)
    (8, 32, 8, 128, 32),  # Llama-3-8B
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_gpu(batch, q_heads, kv_heads, dim, block_size, dtype):
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 3000, (batch,), generator=g).tolist()
    q, kc, vc, tables, context_lens = _case(batch, q_heads, kv_heads, dim, block_size, lens, dtype, "cuda", seed=batch)
    ref = paged_decode_attention_ref(q, kc, vc, tables, context_lens, dim**-0.5)
    for splits in (1, choose_num_splits(batch, kv_heads, 3000, 512), 6):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, context_lens, dim**-0.5, num_splits=splits, partition=512, out=out)
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("batch,q_heads,kv_heads,dim", [(1, 9, 3, 64), (1, 9, 1, 64), (4, 32, 8, 128),
                                                         (1, 32, 32, 128)])
def test_split_merge_deterministic_and_graph_safe_gpu(batch, q_heads, kv_heads, dim):
    """The in-launch merge on real concurrency: many launches give bitwise the same output (a
    merge that read a partial before it was written would not), and CUDA-graph replays with new
    contexts match the reference (the tickets are back at zero after every launch)."""
    g = torch.Generator().manual_seed(dim)
    lens = torch.randint(1, 4096, (batch,), generator=g).tolist()
    q, kc, vc, tables, context_lens = _case(batch, q_heads, kv_heads, dim, 16, lens, torch.bfloat16, "cuda", seed=1)
    splits = 32  # the engine's batch-1 count at max_model_len 4096, partition 128
    run = lambda: paged_decode_attention(q, kc, vc, tables, context_lens, dim**-0.5, num_splits=splits,  # noqa: E731
                                         partition=128, out=out)
    out = torch.empty_like(q)
    first = run().clone()  # eager: also allocates the tickets before the capture
    for _ in range(200):
        run()
    torch.cuda.synchronize()
    assert torch.equal(out, first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for i in range(10):
        new_lens = torch.randint(1, tables.shape[1] * 16 + 1, (batch,), generator=g)
        context_lens.copy_(new_lens)
        q.copy_(torch.randn(q.shape, generator=g))
        graph.replay()
        ref = paged_decode_attention_ref(q, kc, vc, tables, context_lens, dim**-0.5)
        assert _rel(out, ref) < 1e-2, i
    assert not split_counters(q.device, batch * kv_heads)[: batch * kv_heads].any()
