"""The skinny GEMM and its fused prologue/epilogues against the unfused torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import MAX_NORM_K, SMALL_M, gemv, gemv_config, gemv_ref


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _case(m, n, k, dtype, device, *, bias=False, norm=False, residual=False, swiglu=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n if swiglu else n
    x = torch.randn(m, k, generator=g) * (3.0 if norm else 1.0)  # norm input: the unscaled residual stream
    w = torch.randn(rows, k, generator=g) / k**0.5
    kw = {}
    if bias:
        kw["bias"] = torch.randn(rows, generator=g).to(device, dtype)
    if norm:
        kw["norm_weight"] = (1.0 + 0.3 * torch.randn(k, generator=g)).to(device, dtype)
        kw["eps"] = 1e-5
    if residual:
        kw["residual"] = torch.randn(m, n, generator=g).to(device, dtype)
    return x.to(device, dtype), w.to(device, dtype), kw


FUSIONS = {
    "plain": {},
    "bias": dict(bias=True),
    "norm": dict(norm=True),
    "norm_bias": dict(norm=True, bias=True),  # Qwen2 qkv
    "residual": dict(residual=True),
    "norm_swiglu": dict(norm=True, swiglu=True),  # gate_up
    "swiglu_bias_residual": dict(swiglu=True, bias=True, residual=True),
}


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(m, fusion, dtype):
    # n and k are not multiples of any block size.
    x, w, kw = _case(m, 37, 83, dtype, DEVICE, seed=m, **FUSIONS[fusion])
    swiglu = FUSIONS[fusion].get("swiglu", False)
    ref = gemv_ref(x, w, swiglu=swiglu, **kw)
    out = gemv(x, w, swiglu=swiglu, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 3])
def test_k_loop_and_forced_configs(m):
    """Several K steps, and configs other than the heuristic's (a partial last K block, N tail)."""
    x, w, kw = _case(m, 45, 300, torch.float32, DEVICE, norm=True, residual=True, seed=7)
    ref = gemv_ref(x, w, **kw)
    configs = [(1, 4, 64, 1), (1, 16, 128, 2)] if m == 1 else [(16, 16, 64, 4), (16, 32, 128, 4)]
    for config in configs:
        torch.testing.assert_close(gemv(x, w, config=config, **kw), ref, rtol=1e-5, atol=1e-5)


def test_residual_in_place_and_strided_input():
    x, w, kw = _case(3, 40, 64, torch.float32, DEVICE, residual=True, seed=3)
    wide = torch.randn(3, 100, device=DEVICE)
    wide[:, 10:74] = x
    ref = gemv_ref(x, w, **kw)
    h = kw["residual"]
    out = gemv(wide[:, 10:74], w, residual=h, out=h)  # row stride 100, written into the residual
    assert out is h
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


def test_norm_matches_the_rmsnorm_module_bitwise_at_k_1():
    """With one input column the matmul is a single product: the prologue's normalised value must
    be exactly the reference's (same rounding order), not merely close."""
    x, w, kw = _case(4, 8, 1, torch.bfloat16, DEVICE, norm=True, seed=5)
    w = torch.ones_like(w)
    assert torch.equal(gemv(x, w, **kw), gemv_ref(x, w, **kw))


def test_config_fills_the_gpu():
    # SmolLM2-135M decode shapes at batch 1: enough programs for 132 SMs.
    for n, k in [(1728, 576), (960, 576), (576, 576), (576, 1536), (1536, 576)]:
        block_m, block_n, block_k, _ = gemv_config(1, n, k)
        assert block_m == 1 and -(-n // block_n) >= 100
    assert gemv_config(SMALL_M, 4096, 11008)[2] < 11008  # large K loops over K blocks


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [
    (960, 576), (576, 576), (1536, 576), (576, 1536),  # SmolLM2-135M qkv, o, gate_up (swiglu: 2 x 1536), down
    (12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008),  # Llama-2-7B
])
@pytest.mark.parametrize("fusion", ["plain", "norm_bias", "residual", "norm_swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu(m, shape, fusion, dtype):
    n, k = shape
    if "norm" in fusion and k > MAX_NORM_K:
        pytest.skip("the norm prologue is for hidden-size inputs")
    x, w, kw = _case(m, n, k, dtype, "cuda", seed=m + n, **FUSIONS[fusion])
    swiglu = FUSIONS[fusion].get("swiglu", False)
    ref = gemv_ref(x, w, swiglu=swiglu, **kw)
    out = gemv(x, w, swiglu=swiglu, **kw)
    assert _rel(out, ref) < 1e-2
