"""The fused 2:4 + int4 decode GEMV at M == 1 (kernels/quant_gemv.py's sparse24_gemv_fused and
sparse24_gemv_rope_store, reached through kernels/gemv.py's gemv / gemv_rope_store with quant
"sparse24_int4"): each fusion against the torch references (kernels/gemv.py's gemv_ref and
gemv_rope_store_ref on the fp32 dequantized weight), and bit for bit against the unfused chain it
replaces (the 2:4 fast GEMV between the torch norm / SwiGLU / residual references), on random
codes, positions, scales, zero points and inputs at ragged N, groups 32 / 64 / 128, bf16 and fp16."""

from __future__ import annotations

import pytest
import torch
from test_quant_gemv_sparse24 import DEVICE, _rel, _to, sparse24_int4_weight

from kernels import quant as ref
from kernels.activation import silu_and_mul_ref
from kernels.decode_gemv import gemv, gemv_rope_store
from kernels.gemv import gemv_ref, gemv_rope_store_ref
from kernels.quant_gemv import sparse24_gemv, sparse24_gemv_fused
from kernels.rmsnorm import rmsnorm_ref

EPS = 1e-5


def _case(n_rows: int, k: int, group: int, zero: bool, dtype: torch.dtype, seed: int):
    """A random 2:4 + int4 weight of n_rows rows, its fp32 dequantized weight, and a random x row,
    norm weight and bias of dtype (on DEVICE)."""
    packed, meta, scale, zeros = (_to(t, DEVICE) for t in sparse24_int4_weight(n_rows, k, group, zero, seed=seed))
    g = torch.Generator().manual_seed(seed + 100)
    x = (torch.randn(1, k, generator=g) * 3).to(DEVICE, dtype)
    nw = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    bias = (torch.randn(n_rows, generator=g) * 0.1).to(DEVICE, dtype)
    dense = ref.sparse24_int4_dequantize(packed, meta, scale, zeros)
    return (packed, meta, scale, zeros), dense, x, nw, bias


def _unfused(x, weight, bias, *, norm_weight=None, swiglu=False, residual=None):
    """The unfused modules around the 2:4 fast GEMV: rmsnorm, the GEMV (+ bias), silu_and_mul,
    the residual add, each rounded to the dtype as its own launch writes it."""
    if norm_weight is not None:
        x = rmsnorm_ref(x, norm_weight, EPS)
    y = sparse24_gemv(x, *weight, bias, path="fast")
    if swiglu:
        y = silu_and_mul_ref(y)
    return y if residual is None else y + residual


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", ["norm", "norm_swiglu", "residual"])
def test_fused_matches_references(group, zero, dtype, fusion):
    """qkv / gate_up (norm prologue, SwiGLU on the stacked gate, up rows) and o_proj / down (residual
    epilogue, out the residual itself): gemv_ref's result on the fp32 weight within the summation
    order, and the unfused chain's bit for bit. N 7 (odd), K three groups (a ragged last K step at
    BLOCK_K 2 groups), bias on. At these widths FAST_MIN_PROGRAMS makes every config one column a
    program (no column masked at any N); N is small because the interpreter runs each program in
    Python, one at a time (tests/kernels/test_quant_gemv_sparse24.py masks columns past a ragged N)."""
    n, k = 7, 3 * group
    swiglu = fusion == "norm_swiglu"
    weight, dense, x, nw, bias = _case(2 * n if swiglu else n, k, group, zero, dtype, seed=group + zero)
    kw = {"norm_weight": nw} if fusion != "residual" else {}
    if fusion == "residual":
        residual = torch.randn(1, n, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
        h = residual.clone()
        want_unfused = _unfused(x, weight, bias, residual=residual)
        want = gemv_ref(x, dense, bias, residual=residual)
        packed, meta, scale, zeros = weight
        out = gemv(x, packed, bias, quant="sparse24_int4", meta=meta, scale=scale, zero=zeros, fast=True,
                   residual=h, out=h)
        assert out.data_ptr() == h.data_ptr()
    else:
        want_unfused = _unfused(x, weight, bias, norm_weight=nw, swiglu=swiglu)
        want = gemv_ref(x, dense, bias, norm_weight=nw, eps=EPS, swiglu=swiglu)
        for config in [(2, 2 * group, 4), None]:
            out = sparse24_gemv_fused(x, *weight, bias, eps=EPS, swiglu=swiglu, config=config, **kw)
            torch.testing.assert_close(out, want_unfused, rtol=0, atol=0)
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out, want_unfused, rtol=0, atol=0)
    assert _rel(out, want) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("group,zero,dtype", [(32, True, torch.bfloat16), (64, False, torch.float16),
                                              (128, True, torch.float16), (128, False, torch.bfloat16)])
def test_fused_rope_store_matches_reference(group, zero, dtype):
    """The qkv launch with rotary and the KV store (GQA: 4 q heads, 2 kv heads, head_dim 8; a small
    head_dim because the interpreter runs one program a rotary pair): q, the cached k and v as
    gemv_rope_store_ref's on the fp32 weight, within one rounding; other cache slots untouched; a
    padding row (slot -1) stores nothing."""
    heads, kv_heads, head_dim, k = 4, 2, 8, 2 * group
    n = (heads + 2 * kv_heads) * head_dim
    weight, dense, x, nw, bias = _case(n, k, group, zero, dtype, seed=7 + group)
    packed, meta, scale, zeros = weight
    g = torch.Generator().manual_seed(8)
    cos = torch.randn(32, head_dim, generator=g).to(DEVICE)
    sin = torch.randn(32, head_dim, generator=g).to(DEVICE)
    cos[:, head_dim // 2:] = cos[:, : head_dim // 2]  # neox tables: both halves the same angles
    sin[:, head_dim // 2:] = sin[:, : head_dim // 2]
    positions = torch.tensor([13], device=DEVICE)
    for slot in (5, -1):
        fill = torch.randn(3, 4, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        caches = [fill.clone(), fill.clone() * 2]
        want_caches = [fill.clone(), fill.clone() * 2]
        slots = torch.tensor([slot], device=DEVICE)
        q = gemv_rope_store(x, packed, bias, quant="sparse24_int4", meta=meta, scale=scale, zero=zeros, fast=True,
                            norm_weight=nw, eps=EPS, positions=positions, cos_table=cos, sin_table=sin,
                            k_cache=caches[0], v_cache=caches[1], slot_mapping=slots, num_heads=heads,
                            num_kv_heads=kv_heads)
        want = gemv_rope_store_ref(x, dense, bias, norm_weight=nw, eps=EPS, positions=positions, cos_table=cos,
                                   sin_table=sin, k_cache=want_caches[0], v_cache=want_caches[1],
                                   slot_mapping=slots, num_heads=heads, num_kv_heads=kv_heads)
        assert q.shape == (1, heads * head_dim) and q.dtype == dtype
        assert _rel(q, want) < 1e-2
        for got, exp, orig in zip(caches, want_caches, [fill, fill * 2]):
            written = got.view(-1, kv_heads, head_dim)
            others = [s for s in range(12) if s != slot]
            torch.testing.assert_close(written[others], orig.view(-1, kv_heads, head_dim)[others], rtol=0, atol=0)
            if slot >= 0:
                assert _rel(written[slot], exp.view(-1, kv_heads, head_dim)[slot]) < 1e-2
                assert not torch.equal(written[slot], orig.view(-1, kv_heads, head_dim)[slot])


def test_gemv_refuses_what_the_fused_2_4_kernel_cannot_take():
    """One clear error each: more than one row, fp32 x, batch-invariant mode, the exact path, a
    group the fast kernel does not take."""
    (packed, meta, scale, zeros), _, x, nw, _ = _case(16, 64, 32, False, torch.bfloat16, seed=3)
    args = dict(quant="sparse24_int4", meta=meta, scale=scale, fast=True)
    with pytest.raises(ValueError, match="2 rows"):
        gemv(x.repeat(2, 1), packed, **args)
    with pytest.raises(ValueError, match="float32"):
        gemv(x.float(), packed, **args)
    with pytest.raises(ValueError, match="batch_invariant True"):
        gemv(x, packed, **args, batch_invariant=True)
    with pytest.raises(ValueError, match="fast False"):
        gemv(x, packed, **{**args, "fast": False})
    odd_scale = torch.rand(16, 64 // 8, device=DEVICE)  # group 8: not the fast kernel's
    with pytest.raises(ValueError, match="do not fit K 64"):
        sparse24_gemv_fused(x, packed, meta, odd_scale)
    with pytest.raises(ValueError, match="swiglu on 17 rows"):
        sparse24_gemv_fused(x, torch.cat([packed, packed[:1]]), torch.cat([meta, meta[:1]]),
                            torch.cat([scale, scale[:1]]), swiglu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,fusion", [((4096 * 3, 4096), "norm"), ((2 * 11008, 4096), "norm_swiglu"),
                                          ((4096, 11008), "residual"), ((4096, 4096), "residual")])
def test_fused_gpu_llama_7b_shapes(shape, fusion):
    """Llama-2-7B's decode shapes, g128 with zero points, bf16, compiled with PDL: gemv_ref's result
    on the fp32 weight within the summation order (and the one-ulp rounding flips it moves)."""
    rows, k = shape
    swiglu = fusion == "norm_swiglu"
    weight, dense, x, nw, bias = _case(rows, k, 128, True, torch.bfloat16, seed=31)
    n = rows // 2 if swiglu else rows
    if fusion == "residual":
        residual = torch.randn(1, n, device=DEVICE).to(torch.bfloat16)
        out = sparse24_gemv_fused(x, *weight, residual=residual.clone(), pdl=True)
        want = gemv_ref(x, dense, residual=residual)
    else:
        out = sparse24_gemv_fused(x, *weight, norm_weight=nw, eps=EPS, swiglu=swiglu, pdl=True)
        want = gemv_ref(x, dense, norm_weight=nw, eps=EPS, swiglu=swiglu)
    assert _rel(out, want) < 1e-2
