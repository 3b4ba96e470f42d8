"""The decode GEMV on int8 / int4 weights (dequantized in registers) with every fusion, against
the torch reference on the dequantized weight (kernels/quant.py), at ragged shapes."""

from __future__ import annotations

import pytest
import torch

from kernels import quant as ref
from kernels.gemv import gemv, gemv_ref, gemv_rope_store, gemv_rope_store_ref
from support import with_pairwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quant_weight(rows: int, k: int, quant: str, group: int = 32, zero: bool = False, seed: int = 0):
    """Random codes and scales in kernels/quant.py's layout: (weight, scale, zero, dense fp32)."""
    g = torch.Generator().manual_seed(seed)
    if quant == "int8":
        codes = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
        scale = (torch.rand(rows, generator=g) + 0.5) / (127 * k**0.5)
        return codes, scale, None, codes.float() * scale[:, None]
    codes = torch.randint(-8, 8, (rows, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(rows, k // group, generator=g) + 0.5) / (8 * k**0.5)
    zeros = torch.randint(-3, 4, scale.shape, generator=g).float() if zero else None
    return ref.pack_int4(codes), scale, zeros, ref.dequantize_grouped(codes, scale, zeros)


def _to(t, device, dtype=None):
    return None if t is None else t.to(device) if dtype is None else t.to(device, dtype)


def _fusion_args(m, n, k, dtype, *, bias=False, norm=False, residual=False, swiglu=False, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    rows = 2 * n if swiglu else n
    x = torch.randn(m, k, generator=g) * (3.0 if norm else 1.0)
    kw = {}
    if bias:
        kw["bias"] = torch.randn(rows, generator=g).to(DEVICE, dtype)
    if norm:
        kw["norm_weight"] = (1.0 + 0.3 * torch.randn(k, generator=g)).to(DEVICE, dtype)
        kw["eps"] = 1e-5
    if residual:
        kw["residual"] = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    return x.to(DEVICE, dtype), kw


FUSIONS = {"plain": {}, "norm_bias": dict(norm=True, bias=True), "residual": dict(residual=True),
           "norm_swiglu": dict(norm=True, swiglu=True)}
WEIGHTS = {"int8": ("int8", 0, False), "int4_g32": ("int4", 32, False), "int4_g64_zero": ("int4", 64, True),
           "int4_g128_zero": ("int4", 128, True)}


# Every M (1, a partial 16-row tile, a full one), weight format and dtype; the fusions (prologue /
# epilogue, apart from the dequantization) pairwise: each meets every M, format and dtype.
@pytest.mark.parametrize("m,weights,dtype,fusion", with_pairwise(
    [(m, weights, dtype) for m in (1, 5, 16) for weights in WEIGHTS for dtype in (torch.float32, torch.bfloat16)],
    list(FUSIONS)))
def test_quant_gemv_matches_reference(m, fusion, weights, dtype):
    quant, group, zero = WEIGHTS[weights]
    n = 37  # not a multiple of any block
    k = 3 * max(group, 32)  # several groups, not a power of two
    swiglu = FUSIONS[fusion].get("swiglu", False)
    w, scale, zeros, dense = quant_weight(2 * n if swiglu else n, k, quant, group or 32, zero, seed=m)
    x, kw = _fusion_args(m, n, k, dtype, seed=m, **FUSIONS[fusion])
    expected = gemv_ref(x, dense.to(DEVICE, dtype), swiglu=swiglu, **kw)
    out = gemv(x, _to(w, DEVICE), swiglu=swiglu, quant=quant, scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE), **kw)
    assert out.shape == expected.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 1e-2


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quant_gemv_bf16_equals_the_module_reference(quant):
    """Without fusions the kernel rounds as the compressed linears' torch references do."""
    n, k = 40, 256
    w, scale, zeros, _ = quant_weight(n, k, quant, 64, quant == "int4", seed=5)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.bfloat16)
    w, scale, zeros = _to(w, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE)
    expected = (ref.int8_linear_ref(x, w, scale) if quant == "int8" else ref.int4_linear_ref(x, w, scale, zeros))
    out = gemv(x, w, quant=quant, scale=scale, zero=zeros)
    assert _rel(out, expected) < 4e-3  # summation order only


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("weights", ["int8", "int4_g32", "int4_g64_zero"])
def test_quant_rope_store_matches_reference(m, weights):
    quant, group, zero = WEIGHTS[weights]
    heads, kv_heads, head_dim, k = 6, 2, 16, 192
    n = (heads + 2 * kv_heads) * head_dim
    w, scale, zeros, dense = quant_weight(n, k, quant, group or 32, zero, seed=m)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    blocks, block_size = 4, 4
    cache = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    ref_cache = cache.clone()
    positions = torch.randint(0, 60, (m,), generator=g).to(DEVICE)
    angles = torch.arange(64)[:, None] * (1e-2 * torch.arange(1, head_dim // 2 + 1))[None, :]
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(DEVICE)
    kw = dict(norm_weight=(1 + 0.3 * torch.randn(k, generator=g)).to(DEVICE), eps=1e-5, positions=positions,
              cos_table=cos, sin_table=sin, slot_mapping=torch.randperm(blocks * block_size, generator=g)[:m].to(DEVICE),
              num_heads=heads, num_kv_heads=kv_heads)
    expected = gemv_rope_store_ref(x, dense.to(DEVICE), k_cache=ref_cache[0], v_cache=ref_cache[1], **kw)
    out = gemv_rope_store(x, _to(w, DEVICE), k_cache=cache[0], v_cache=cache[1], quant=quant,
                          scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE), **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, ref_cache, rtol=1e-5, atol=1e-5)


def test_int4_pack_round_trips():
    codes = torch.randint(-8, 8, (5, 48), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(codes)), codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", [(4096, 4096), (22016, 4096), (4096, 11008)])
@pytest.mark.parametrize("weights", ["int8", "int4_g64_zero", "int4_g128_zero"])
def test_quant_gemv_gpu_real_shapes(m, shape, weights):
    quant, group, zero = WEIGHTS[weights]
    n, k = shape
    w, scale, zeros, dense = quant_weight(n, k, quant, group or 32, zero, seed=2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    out = gemv(x, w.cuda(), quant=quant, scale=scale.cuda(), zero=_to(zeros, "cuda"))
    expected = gemv_ref(x, dense.to("cuda", torch.bfloat16))
    assert _rel(out, expected) < 1e-2


def test_sparse24_meta_and_compress_round_trip():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    w.view(-1, 4).scatter_(1, w.view(-1, 4).abs().argsort(dim=1)[:, :2], 0.0)
    w[0, :4] = 0.0  # a group with no nonzero keeps two zeros
    values, positions = ref.compress_24(w)
    assert torch.equal(ref.unpack_meta_24(ref.pack_meta_24(positions)), positions)
    assert torch.equal(ref.decompress_24(values, positions), w)
    with pytest.raises(ValueError, match="2:4"):
        ref.compress_24(torch.ones(2, 8))


@pytest.mark.parametrize("group,zero", [(32, False), (64, True), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_kernel_is_exact(group, zero, dtype):
    """The prefill path's dequantization equals the reference's bit for bit (same fp32
    arithmetic, one rounding)."""
    from kernels.quant_dequant import dequantize_int4

    packed, scale, zeros, _ = quant_weight(21, 3 * group, "int4", group, zero, seed=4)
    packed, scale, zeros = _to(packed, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE)
    expected = ref.dequantize_grouped(ref.unpack_int4(packed), scale, zeros).to(dtype)
    assert torch.equal(dequantize_int4(packed, scale, zeros, dtype), expected)


def w8a8_gemv_ref(x, codes, scale, bias=None, *, norm_weight=None, eps=1e-6, residual=None, swiglu=False):
    """The unfused modules: rmsnorm, W8A8Linear's reference (per-token int8 input), SwiGLU, residual."""
    from kernels.activation import silu_and_mul_ref
    from kernels.rmsnorm import rmsnorm_ref

    if norm_weight is not None:
        x = rmsnorm_ref(x, norm_weight, eps)
    y = ref.w8a8_linear_ref(x, codes, scale, "int8", bias)
    if swiglu:
        y = silu_and_mul_ref(y)
    return y if residual is None else y + residual


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_int8_gemv_quantizes_the_input_in_the_prologue(m, fusion, dtype):
    n, k = 37, 200
    swiglu = FUSIONS[fusion].get("swiglu", False)
    codes, scale, _, _ = quant_weight(2 * n if swiglu else n, k, "int8", seed=m)
    x, kw = _fusion_args(m, n, k, dtype, seed=m, **FUSIONS[fusion])
    x[0, :5] *= 20.0  # one row with outliers: per-token scales differ by row
    codes, scale = codes.to(DEVICE), scale.to(DEVICE)
    expected = w8a8_gemv_ref(x, codes, scale, swiglu=swiglu, **kw)
    out = gemv(x, codes, swiglu=swiglu, quant="w8a8_int8", scale=scale, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 1e-2
    # not the unquantized input's result
    unquantized = gemv_ref(x.float(), (codes.float() * scale[:, None]), swiglu=swiglu,
                           **{key: v.float() for key, v in kw.items() if torch.is_tensor(v)},
                           **{key: v for key, v in kw.items() if not torch.is_tensor(v)})
    assert (out.float() - unquantized).abs().max() > 1e-4


def _w8a8_tie_rows_case(m: int, k: int, fast: bool, device: str) -> None:
    """gemv's W8A8 prologue on rows whose absmax element's code is one off unless the activation
    scale is the IEEE division absmax / 127.5 (test_w8a8.absmax_tie_rows), fp32, against the
    reference: one flipped code moves its row's outputs by ~1e-3 of their size, far past the bound."""
    from test_w8a8 import absmax_tie_rows

    x = absmax_tie_rows(m, k, seed=k).to(device)
    codes, scale, _, _ = quant_weight(37, k, "int8", seed=m)
    codes, scale = codes.to(device), scale.to(device)
    out = gemv(x, codes, quant="w8a8_int8", scale=scale, fast=fast)
    torch.testing.assert_close(out, w8a8_gemv_ref(x, codes, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,fast", [(1, True), (1, False), (12, False)])
def test_w8a8_int8_gemv_scale_is_the_division(m, fast):
    """The prologue's activation scale is kernels/quant.py's, absmax / 127.5 divided (not times a
    reciprocal). The interpreter divides exactly whether the kernel writes `/` or tl.math.div_rn:
    the GPU test below tells those apart."""
    _w8a8_tie_rows_case(m, 64, fast, DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,fast", [(1, True), (12, False)])
def test_w8a8_int8_gemv_scale_is_the_division_gpu(m, fast):
    """As above at K 4096 on the GPU, where Triton's fp32 `/` is an approximate division."""
    _w8a8_tie_rows_case(m, 4096, fast, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008)])
def test_w8a8_int8_gemv_gpu_real_shapes(m, shape):
    n, k = shape
    codes, scale, _, _ = quant_weight(n, k, "int8", seed=2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    codes, scale = codes.cuda(), scale.cuda()
    out = gemv(x, codes, quant="w8a8_int8", scale=scale)
    assert _rel(out, w8a8_gemv_ref(x, codes, scale)) < 1e-2


@pytest.mark.parametrize("m,config", [(1, (1, 4, 16, 1)), (1, (1, 8, 64, 1)), (3, (16, 16, 32, 4))])
def test_int4_tiles_narrower_than_a_group(m, config):
    """K tiles of 16 or 32 inputs against groups of 64 take the per-element dequantization; 64 the
    per-group one. Both equal the reference."""
    w, scale, zeros, dense = quant_weight(21, 192, "int4", 64, True, seed=8)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = gemv(x, _to(w, DEVICE), quant="int4", scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE), config=config)
    torch.testing.assert_close(out, gemv_ref(x, dense.to(DEVICE)), rtol=1e-5, atol=1e-5)
