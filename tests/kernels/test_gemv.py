"""The skinny GEMM and its fused prologue/epilogues against the unfused torch references."""

from __future__ import annotations

import pytest
import torch

import kernels.gemv as gemv_module
from kernels.gemv import (
    MAX_NORM_K, SMALL_M, gemv, gemv_config, gemv_ref, gemv_rope_store, gemv_rope_store_config, gemv_rope_store_ref,
    large_rows, separate_norm,
)
from kernels.rotary import rope_store


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


# -- qkv projection + rotary + KV store in one launch --------------------------------------------

def _rope_case(m, q_heads, kv_heads, head_dim, k, dtype, device, *, bias=False, norm=True, seed=0,
               max_pos=4096, block_size=4):
    """Inputs of gemv_rope_store: weights, fp32 neox tables of a realistic length, positions across
    the whole table, a cache with random contents, distinct slots; row 1 is a padding row (-1)."""
    g = torch.Generator().manual_seed(seed)
    n = (q_heads + 2 * kv_heads) * head_dim
    x = (torch.randn(m, k, generator=g) * 3.0).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * torch.rand(head_dim // 2, generator=g)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    num_blocks = 2 * SMALL_M // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:m]
    if m > 1:
        slots[1] = -1
    kw = dict(
        bias=torch.randn(n, generator=g).to(device, dtype) if bias else None,
        norm_weight=(1.0 + 0.3 * torch.randn(k, generator=g)).to(device, dtype) if norm else None, eps=1e-5,
        positions=torch.randint(0, max_pos, (m,), generator=g).to(device),
        cos_table=emb.cos().to(device), sin_table=emb.sin().to(device),
        slot_mapping=slots.to(device), num_heads=q_heads, num_kv_heads=kv_heads,
    )
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    return x, w, kw, cache


def _check_rope_store(x, w, kw, cache, tol, config=None):
    """The kernel's q and whole caches (untouched slots included) against the reference's."""
    ref_cache = cache.clone()
    ref = gemv_rope_store_ref(x, w, k_cache=ref_cache[0], v_cache=ref_cache[1], **kw)
    out = gemv_rope_store(x, w, k_cache=cache[0], v_cache=cache[1], config=config, **kw)
    assert out.shape == ref.shape and out.dtype == x.dtype
    if tol is None:  # exact
        assert torch.equal(out, ref) and torch.equal(cache, ref_cache)
    elif x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(cache, ref_cache, rtol=tol, atol=tol)
    else:  # the written slots close, every other slot untouched
        slots = kw["slot_mapping"][kw["slot_mapping"] >= 0]
        written = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool, device=cache.device)
        written[slots] = True
        flat, ref_flat = cache.flatten(1, 2), ref_cache.flatten(1, 2)
        assert _rel(out, ref) < tol and _rel(flat[:, written], ref_flat[:, written]) < tol
        assert torch.equal(flat[:, ~written], ref_flat[:, ~written])


ROPE_FUSIONS = {"llama": dict(norm=True), "qwen2": dict(norm=True, bias=True), "plain": dict(norm=False)}


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("fusion", list(ROPE_FUSIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_matches_reference(m, fusion, dtype):
    # 3 q heads of 16 per KV head (GQA); K not a multiple of any block size.
    x, w, kw, cache = _rope_case(m, 6, 2, 16, 83, dtype, DEVICE, seed=m, **ROPE_FUSIONS[fusion])
    _check_rope_store(x, w, kw, cache, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("m", [1, 3])
def test_rope_store_blocks_across_heads(m):
    """Pair blocks that straddle head and q/k/v boundaries, head_dim 24 (12 pairs: no power of 2),
    one KV head, several K steps with a partial last one."""
    x, w, kw, cache = _rope_case(m, 4, 1, 24, 100, torch.float32, DEVICE, bias=True, seed=11)
    configs = [(1, 8, 32, 1), (1, 1, 128, 1)] if m == 1 else [(16, 16, 32, 4)]
    for config in configs:
        _check_rope_store(x, w, kw, cache.clone(), 1e-5, config=config)


def test_rope_store_equals_gemv_then_rope_store():
    """The unfused engine path (gemv, then kernels/rotary.py's rope_store on views of its output):
    at M == 1 the fused kernel sums each column in the same order, so fp32 results agree bitwise."""
    x, w, kw, cache = _rope_case(1, 6, 2, 16, 83, torch.float32, DEVICE, bias=True, seed=4)
    ref_cache = cache.clone()
    qkv = gemv(x, w, kw["bias"], norm_weight=kw["norm_weight"], eps=kw["eps"], config=gemv_config(1, 160, 83))
    q, k, v = qkv.split([96, 32, 32], dim=-1)
    q, k, v = q.view(1, 6, 16), k.view(1, 2, 16), v.view(1, 2, 16)
    rope_store(q, k, v, kw["positions"], kw["cos_table"], kw["sin_table"], ref_cache[0], ref_cache[1],
               kw["slot_mapping"])
    out = gemv_rope_store(x, w, k_cache=cache[0], v_cache=cache[1], **kw)
    assert torch.equal(out, q.reshape(1, 96)) and torch.equal(cache, ref_cache)


def test_rope_store_bf16_matches_reference_bitwise():
    """bf16 at K = 1: the matmul is one product, so every rounding (qkv output, rotation) must sit
    where the reference has it."""
    x, w, kw, cache = _rope_case(3, 2, 1, 8, 1, torch.bfloat16, DEVICE, bias=True, seed=9)
    _check_rope_store(x, w, kw, cache, None)


def test_rope_store_config_fills_the_gpu():
    # Batch 1: as many programs as the plain gemv (SmolLM2-135M qkv: 960 columns; Llama-2-7B: 12288).
    for n, k in [(960, 576), (12288, 4096)]:
        block_m, block_pairs, _, _ = gemv_rope_store_config(1, n, k)
        assert block_m == 1 and -(-n // (2 * block_pairs)) == -(-n // gemv_config(1, n, k)[1]) >= 132
    assert gemv_rope_store_config(16, 960, 576)[1] >= 16  # tl.dot's minimum width


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [
    (9, 3, 64, 576),  # SmolLM2-135M
    (14, 2, 64, 896),  # Qwen2-0.5B (with bias)
    (32, 32, 128, 4096),  # Llama-2-7B
    (32, 8, 128, 4096),  # Llama-3-8B
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_store_matches_reference_gpu(m, shape, dtype):
    q_heads, kv_heads, head_dim, k = shape
    x, w, kw, cache = _rope_case(m, q_heads, kv_heads, head_dim, k, dtype, "cuda", bias=q_heads == 14,
                                 seed=m + k, max_pos=32768, block_size=16)
    _check_rope_store(x, w, kw, cache, 1e-2)


@pytest.mark.parametrize("m", [2, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separate_norm_matches_reference(monkeypatch, m, dtype):
    """At M > 1 on large weights the norm is a launch of its own (separate_norm) and the large-weight
    configs apply: LATENCY_BYTES lowered to 0 sends these small shapes down that path. Each call
    normalises once in a launch of its own (counted), and matches the unfused reference."""
    monkeypatch.setattr(gemv_module, "LATENCY_BYTES", 0)
    calls = []
    launch = gemv_module._norm_launch
    monkeypatch.setattr(gemv_module, "_norm_launch", lambda *a: calls.append(a[0].shape) or launch(*a))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for fusion in ("norm_bias", "norm_swiglu"):
        x, w, kw = _case(m, 37, 83, dtype, DEVICE, seed=m, **FUSIONS[fusion])
        swiglu = fusion == "norm_swiglu"
        assert separate_norm(m, w, False) and not separate_norm(m, w, True)
        out, ref = gemv(x, w, swiglu=swiglu, **kw), gemv_ref(x, w, swiglu=swiglu, **kw)
        assert _rel(out, ref) < tol
    x, w, kw, cache = _rope_case(m, 6, 2, 16, 83, dtype, DEVICE, seed=m, norm=True)
    _check_rope_store(x, w, kw, cache, tol)
    assert calls == [(m, 83)] * 3
    gemv(x, w[:37], norm_weight=kw["norm_weight"], batch_invariant=True)  # the prologue: rows reduce as at M == 1
    assert len(calls) == 3


def test_separate_norm_and_large_weight_configs():
    """Which calls launch the norm apart, and the M > 1 configs of large weights (gemv_config's sweep)."""
    big = torch.empty(4096, 1024, dtype=torch.bfloat16, device="meta")  # 8 MB
    small = torch.empty(960, 576, dtype=torch.bfloat16, device="meta")  # SmolLM2-135M's qkv
    assert separate_norm(2, big, False) and separate_norm(16, big, False)
    assert not separate_norm(1, big, False) and not separate_norm(2, big, True) and not separate_norm(2, small, False)
    assert large_rows(2, big) and not large_rows(1, big) and not large_rows(16, small)  # launched without PDL
    assert gemv_config(16, 11008, 4096, two=True)[2] == 128  # Llama-2-7B gate_up, 16-bit
    assert gemv_config(16, 11008, 4096, two=True, elem_bytes=1)[2] == 256  # int8
    assert gemv_config(16, 4096, 11008)[2] == 512 and gemv_config(16, 4096, 4096)[2] == 256  # down, o_proj
    assert gemv_config(16, 4096, 11008, elem_bytes=0.5)[2] == 256  # int4: not swept, as before
    assert gemv_rope_store_config(16, 12288, 4096, elem_bytes=0.5)[1] == 16
    assert gemv_config(16, 768, 576, two=True)[2] == 256 and gemv_config(16, 576, 1536)[2] == 512  # SmolLM2: as before
    assert gemv_rope_store_config(16, 12288, 4096)[1] == 32  # 64 columns a program
    # SmolLM2's latency-bound qkv and o_proj at 2-16 rows: one K step, the whole W tile loaded before the PDL
    # wait (the twenty-sixth session's sweep); int8 and int4 tiles keep the earlier configs (not swept so)
    for m in (2, 5, 16):
        assert gemv_rope_store_config(m, 960, 576) == (16, 32, 1024, 4)
        assert gemv_config(m, 576, 576) == (16, 16, 1024, 4) and gemv_config(m, 1536, 576, two=True) == (16, 32, 256, 4)
    assert gemv_config(16, 576, 576, elem_bytes=1)[2] == 256 and gemv_config(16, 576, 1536)[2] == 512
