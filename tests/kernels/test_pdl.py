"""Programmatic dependent launch (Hopper): a chain of decode kernels, each reading what the one
before wrote, gives bitwise the same result with PDL on and off, launched eagerly and replayed in
a CUDA graph. A kernel that read the previous kernel's output before its wait would not: also a
verify's pseudo-rows, where a row attends to K/V the same qkv launch stored for the rows before it."""

from __future__ import annotations

import pytest
import torch

from kernels._triton import pdl_available
from kernels.gemv import gemv, gemv_rope_store
from kernels.paged_attention import paged_decode_attention

pytestmark = pytest.mark.gpu


def _layers(num_layers, hidden, inter, heads, kv_heads, head_dim, g):
    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to("cuda", torch.bfloat16)

    n_qkv = (heads + 2 * kv_heads) * head_dim
    return [dict(qkv=w(n_qkv, hidden), o=w(hidden, heads * head_dim), gate_up=w(2 * inter, hidden),
                 down=w(hidden, inter), n1=1 + w(hidden), n2=1 + w(hidden)) for _ in range(num_layers)]


def _forward(layers, h, positions, cos, sin, k_cache, v_cache, slots, tables, lens, heads, kv_heads, pdl,
             first_new=None):
    """The engine's fused decode layer (engine/models/llama.py forward_fused), kernels only."""
    for p in layers:
        q = gemv_rope_store(h, p["qkv"], norm_weight=p["n1"], positions=positions, cos_table=cos, sin_table=sin,
                            k_cache=k_cache, v_cache=v_cache, slot_mapping=slots, num_heads=heads,
                            num_kv_heads=kv_heads, pdl=pdl)
        o = paged_decode_attention(q.view(h.shape[0], heads, -1), k_cache, v_cache, tables, lens,
                                   k_cache.shape[-1] ** -0.5, num_splits=4, partition=64, pdl=pdl,
                                   first_new=first_new)
        gemv(o.view(h.shape[0], -1), p["o"], residual=h, out=h, pdl=pdl)
        act = gemv(h, p["gate_up"], norm_weight=p["n2"], swiglu=True, pdl=pdl)
        gemv(act, p["down"], residual=h, out=h, pdl=pdl)
    return h


def _outputs(layers, h0, cache0, graphed: bool, make_args) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the layers' outputs, the K cache after) from fresh copies of h0 and the cache: eagerly one
    output, or three replays of a CUDA graph (captured after a warm-up on a copy), each replay from
    the same inputs. ``make_args(k_cache, v_cache)``: _forward's arguments after the hidden states."""
    k_cache, v_cache = cache0[0].clone(), cache0[1].clone()
    h = h0.clone()
    args = make_args(k_cache, v_cache)
    if not graphed:
        return [_forward(layers, h, *args).clone()], k_cache
    _forward(layers, h.clone(), *args)  # warm-up (compiles), on a copy
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _forward(layers, h, *args)
    results = []
    for _ in range(3):
        h.copy_(h0)
        k_cache.copy_(cache0[0])
        v_cache.copy_(cache0[1])
        graph.replay()
        results.append(h.clone())
    torch.cuda.synchronize()
    return results, k_cache


@pytest.mark.skipif(not torch.cuda.is_available() or not pdl_available("cuda"), reason="needs a Hopper GPU")
@pytest.mark.parametrize("batch,hidden,inter,heads,kv_heads,head_dim", [
    (1, 576, 1536, 9, 3, 64),  # SmolLM2-135M
    (4, 4096, 11008, 32, 32, 128),  # Llama-2-7B (K loops over several tiles)
])
def test_pdl_chain_is_bitwise_the_same(batch, hidden, inter, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(hidden)
    layers = _layers(4 if hidden > 1000 else 12, hidden, inter, heads, kv_heads, head_dim, g)
    block_size, width = 16, 16
    num_blocks = batch * width
    cos = torch.randn(4096, head_dim, generator=g).cuda()
    sin = torch.randn(4096, head_dim, generator=g).cuda()
    tables = torch.randperm(num_blocks, generator=g).view(batch, width).to("cuda", torch.int32)
    lens = torch.randint(2, width * block_size, (batch,), generator=g).to("cuda", torch.int32)
    positions = (lens - 1).long()
    slots = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1).long() * block_size + positions % block_size
    h0 = torch.randn(batch, hidden, generator=g).to("cuda", torch.bfloat16)
    cache0 = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to("cuda", torch.bfloat16)

    def run(pdl, graphed):
        return _outputs(layers, h0, cache0, graphed,
                        lambda k, v: (positions, cos, sin, k, v, slots, tables, lens, heads, kv_heads, pdl))

    (want,), want_cache = run(False, False)
    for graphed in (False, True):
        got, got_cache = run(True, graphed)
        assert all(torch.equal(r, want) for r in got), graphed
        assert torch.equal(got_cache, want_cache), graphed


@pytest.mark.skipif(not torch.cuda.is_available() or not pdl_available("cuda"), reason="needs a Hopper GPU")
@pytest.mark.parametrize("graphed", [False, True])
def test_pdl_pseudo_rows_read_the_rows_before_them_after_the_wait(graphed):
    """A speculative verify as decode pseudo-rows (DecodeInputs.prepare_chunks): 3 sequences of 4
    rows, row j at position start + j attending to start + j + 1 tokens, so rows 1..3 read K/V the
    same qkv launch stores for the rows before them. The cache held other K/V there before (a
    rejected draft's, in an engine): with PDL on, the decode attention must read those positions
    after its wait (``first_new``: each row's chunk start), and the layers give bitwise what they
    give with PDL off. Short contexts (12 to 40 tokens): the positions lie in a split's first tile,
    the one read before the wait (issue 17: two H200s emitted a token off by this)."""
    g = torch.Generator().manual_seed(17)
    hidden, inter, heads, kv_heads, head_dim = 576, 1536, 9, 3, 64
    layers = _layers(12, hidden, inter, heads, kv_heads, head_dim, g)
    block_size, width, q_len = 16, 8, 4
    starts = [8, 20, 36]
    rows = len(starts) * q_len
    num_blocks = len(starts) * width
    cos = torch.randn(4096, head_dim, generator=g).cuda()
    sin = torch.randn(4096, head_dim, generator=g).cuda()
    seq_tables = torch.randperm(num_blocks, generator=g).view(len(starts), width).to(torch.int32)
    tables = seq_tables.repeat_interleave(q_len, dim=0).cuda()
    positions = torch.tensor([s + j for s in starts for j in range(q_len)], device="cuda")
    lens = (positions + 1).to(torch.int32)
    first_new = torch.tensor([s for s in starts for _ in range(q_len)], device="cuda")
    slots = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1).long() * block_size + positions % block_size
    h0 = torch.randn(rows, hidden, generator=g).to("cuda", torch.bfloat16)
    cache0 = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to("cuda", torch.bfloat16)

    def run(pdl, graphed):
        return _outputs(layers, h0, cache0, graphed,
                        lambda k, v: (positions, cos, sin, k, v, slots, tables, lens, heads, kv_heads, pdl, first_new))[0]

    (want,) = run(False, False)
    assert all(torch.equal(r, want) for r in run(True, graphed))
