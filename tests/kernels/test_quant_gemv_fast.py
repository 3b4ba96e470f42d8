"""The decode GEMV's fast dequantization (kernels/gemv.py, fast=True) against its own reference:
x times the weight dequantized in fp32, rounded once (kernels/quant.py's fp32_weight_linear_ref,
through gemv_ref on an fp32 weight). Random codes, scales, zero points and inputs (never zeros), at
ragged N, groups 32/64/128, symmetric and asymmetric int4, int8 and W8A8 int8, M = 1..16, every
fusion.

Tolerances: fp32, rtol = atol = 1e-5 (the kernel and the reference differ in summation order
only). bf16 on the fast path (M == 1): elementwise within 2^-7 relative (two bf16 ulps: the sums
agree to fp32 precision before the one rounding; a SwiGLU rounds three times) plus 1e-3 of the
output's rms. Every format at M > 1 runs the exact path (bf16-rounded weights) with ``fast`` set:
relative error norm < 1e-2 against the fp32 reference (the exact path's own bound)."""

from __future__ import annotations

import pytest
import torch

from kernels import quant as ref
from kernels._triton import interpreting
from kernels.gemv import fast_dequant_fits, fast_gemv_config, gemv, gemv_ref, gemv_rope_store, gemv_rope_store_ref
from support import with_pairwise
from test_quant_gemv import DEVICE, FUSIONS, _fusion_args, _rel, _to, quant_weight, w8a8_gemv_ref

WEIGHTS = {"int8": ("int8", 0, False), "int4_g32": ("int4", 32, False), "int4_g64_zero": ("int4", 64, True),
           "int4_g128": ("int4", 128, False), "int4_g128_zero": ("int4", 128, True)}


def _check(out: torch.Tensor, expected: torch.Tensor, fast: bool) -> None:
    """``fast``: the fast path ran (M == 1), else the exact one (M > 1)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert expected.abs().max() > 0
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    elif fast:
        e = expected.float()
        bound = 2.0**-7 * e.abs() + 1e-3 * e.pow(2).mean().sqrt()
        assert bool(((out.float() - e).abs() <= bound).all()), (out.float() - e).abs().max()
    else:
        assert _rel(out, expected) < 1e-2


def _weights(name: str, rows: int, k: int, seed: int):
    quant, group, zero = WEIGHTS[name]
    w, scale, zeros, dense = quant_weight(rows, k, quant, group or 32, zero, seed=seed)
    return quant, w, scale, zeros, dense


# Every M (1: the fast M == 1 path; 5: a partial 16-row tile, 16: a full one, where ``fast`` still
# takes the exact path), weight format and dtype, but fp32 at M > 1 (the exact path, test_quant_gemv.py's);
# the fusions (prologue / epilogue, apart from the dequantization) pairwise: each meets every M,
# format and dtype.
FAST_CASES = with_pairwise([(m, weights, dtype) for m in (1, 5, 16) for weights in WEIGHTS
                            for dtype in (torch.float32, torch.bfloat16)
                            if not (dtype == torch.float32 and m != 1)],
                           list(FUSIONS))


@pytest.mark.parametrize("m,weights,dtype,fusion", FAST_CASES)
def test_fast_gemv_matches_the_fp32_dequantized_reference(m, fusion, weights, dtype):
    n = 37  # not a multiple of any block
    k = 3 * max(WEIGHTS[weights][1], 32)  # several groups, not a power of two
    swiglu = FUSIONS[fusion].get("swiglu", False)
    quant, w, scale, zeros, dense = _weights(weights, 2 * n if swiglu else n, k, seed=m)
    x, kw = _fusion_args(m, n, k, dtype, seed=m, **FUSIONS[fusion])
    expected = gemv_ref(x, dense.to(DEVICE), swiglu=swiglu, **kw)  # fp32 weight: fp32 product, one rounding
    out = gemv(x, _to(w, DEVICE), swiglu=swiglu, quant=quant, scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE),
               fast=True, **kw)
    _check(out, expected, m == 1)


# int8, int4 g32 and g64 with zero points take this form in the K loop tests below ("two_ragged").
@pytest.mark.parametrize("weights", ["int4_g128", "int4_g128_zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_gemv_several_k_steps_and_a_ragged_last_one(weights, dtype):
    """K = 3 groups in steps of 2: the second step half masked, the prefetch past K fully masked;
    4 columns a program over 37."""
    group = WEIGHTS[weights][1] or 32
    n, k = 37, 3 * group
    quant, w, scale, zeros, dense = _weights(weights, n, k, seed=3)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out = gemv(x, _to(w, DEVICE), quant=quant, scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE), fast=True,
               config=(1, 4, 2 * group, 1))
    _check(out, gemv_ref(x, dense.to(DEVICE)), True)


# int4's M == 1 K loop (kernels/gemv.py, _matmul_fast_runs) by (K, BLOCK_K) in groups: one ragged
# step (BLOCK_K past K, masked), two even steps (unrolled, no mask along the words), two with a
# ragged last, and past FAST_UNROLL steps the loop of two steps an iteration: four with a ragged
# last (every step masked, the last iteration's prefetch clamped to the last step), five even
# steps of one group (two iterations and the odd step after them).
INT4_STEPS = {"one_ragged": (3, 4), "two_even": (4, 2), "two_ragged": (3, 2), "four_ragged": (7, 2),
              "five_even": (5, 1)}
# Groups of 8 and 16 inputs hold one or two words: a thread's run of 4 words spans several groups
# (a scale per word); BLOCK_K of 8 or 16 inputs, runs of one or two words.
INT4_LOOP_WEIGHTS = {"g32_swiglu_norm": (32, False, "norm_swiglu"), "g64_zero_residual": (64, True, "residual"),
                     "g8_zero_bias": (8, True, "norm_bias"), "g16_plain": (16, False, "plain")}


# Every K loop form meets every weight layout; x's dtype (its preparation only, not the loop) pairwise.
@pytest.mark.parametrize("steps,weights,dtype", with_pairwise(
    [(steps, weights) for steps in INT4_STEPS for weights in INT4_LOOP_WEIGHTS], [torch.float32, torch.bfloat16]))
def test_fast_int4_k_loop_even_ragged_and_looped(steps, weights, dtype):
    group, zero, fusion = INT4_LOOP_WEIGHTS[weights]
    k_groups, step_groups = INT4_STEPS[steps]
    n, k = 37, k_groups * group
    swiglu = FUSIONS[fusion].get("swiglu", False)
    w, scale, zeros, dense = quant_weight(2 * n if swiglu else n, k, "int4", group, zero, seed=k_groups)
    x, kw = _fusion_args(1, n, k, dtype, seed=step_groups, **FUSIONS[fusion])
    expected = gemv_ref(x, dense.to(DEVICE), swiglu=swiglu, **kw)
    out = gemv(x, _to(w, DEVICE), swiglu=swiglu, quant="int4", scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE),
               fast=True, config=(1, 4, step_groups * group, 1), **kw)
    _check(out, expected, True)


def test_fast_int4_decodes_every_code_at_every_nibble():
    """Each of the 16 codes at each of a word's 8 nibble positions (rows shifted by one code), with
    zero points: one-hot inputs read single columns back exactly."""
    k = 64
    codes = ((torch.arange(16)[:, None] + torch.arange(k)[None, :]) % 16 - 8).to(torch.int8)  # [16, K]
    scale = torch.rand(16, 1, generator=torch.Generator().manual_seed(1)) + 0.5
    zeros = torch.randint(-3, 4, (16, 1), generator=torch.Generator().manual_seed(2)).float()
    dense = ref.dequantize_grouped(codes, scale, zeros)
    packed = ref.pack_int4(codes).to(DEVICE)
    for col in range(8):  # one word: every nibble position, every code across the rows
        x = torch.zeros(1, k)
        x[0, col] = 1.0
        out = gemv(x.to(DEVICE), packed, quant="int4", scale=scale.to(DEVICE), zero=zeros.to(DEVICE), fast=True)
        assert torch.equal(out.cpu()[0], dense[:, col]), col


SM90_FAST_INT4 = """
from experiments.gemv_sass_count import compile_sm90

cases = [  # (group, zero, K, entry, fusions): the K loop's forms and runs across groups
    (128, True, 4096, (8, 2048, 2), dict(SWIGLU=True, NORM=True)),  # two even steps, unrolled, two row sets
    (128, True, 11008, (8, 2048, 2), dict(RESIDUAL=True)),  # looped, ragged
    (64, False, 4352, (8, 2048, 4), dict(NORM=True, HAS_BIAS=True)),  # three steps: one iteration, ragged odd
    (16, True, 4096, (8, 2048, 4), {}),  # runs of 4 words over two groups (a scale a word)
    (32, False, 1536, (8, 1024, 4), dict(SWIGLU=True)),  # two steps, the second ragged
]
for group, zero, k, entry, fusions in cases:
    cubin, _ = compile_sm90("int4", True, group, zero, 1, 4096, k, entry, fusions)
    assert len(cubin) > 0
print("compiled", len(cases))
"""


def test_fast_int4_compiles_for_sm90():
    """The interpreter runs what the GPU compiler may refuse, and never the inline PTX: the fast
    int4 M == 1 kernel compiles for sm_90 with Triton's bundled ptxas in its unrolled, looped and
    ragged forms, with two row sets and fusions (a fresh process without the interpreter)."""
    assert _compile_sm90(SM90_FAST_INT4).strip().splitlines()[-1] == "compiled 5"


def test_fast_int4_prmt_word_is_the_or_under_every_code_mask():
    """On a GPU _int4_fast_mac builds a word's exponent by a PRMT (w's bytes 0..2, byte 3 = 0x4B),
    under the interpreter by OR-ing 0x4B000000 in: the two differ in byte 3 only where _int4_code's
    masks (the exponent's bits and nibble c at bits 4c, c <= 4) drop it, so every code reads the
    same bits (the GPU runs of these tests cover the PTX itself)."""
    words = torch.randint(-2**31, 2**31, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    magic = 0x4B000000
    prmt = (words & 0x00FFFFFF) | magic
    orred = words | magic
    assert bool((prmt != orred).any())  # the bytes 3 differ
    for shift in range(0, 20, 4):
        mask = magic | (0xF << shift)
        assert torch.equal(prmt & mask, orred & mask), shift


def test_fast_int8_decodes_every_byte_value():
    k = 256
    codes = ((torch.arange(4)[:, None] + torch.arange(k)[None, :]) % 256 - 128).to(torch.int8)  # [4, 256]
    scale = torch.tensor([1.0, 0.5, 2.0, 0.25])
    x = torch.zeros(4, k)
    x[torch.arange(4), torch.arange(4)] = 1.0  # byte c of the first word, one row each (M = 1 calls)
    for c in range(4):
        out = gemv(x[c:c + 1].to(DEVICE), codes.to(DEVICE), quant="int8", scale=scale.to(DEVICE), fast=True)
        assert torch.equal(out.cpu()[0], codes[:, c].float() * scale), c
    # and every value: the sum of all columns with power-of-two inputs is exact in fp32
    xs = torch.ldexp(torch.ones(1, k), -torch.arange(k)[None, :] % 8)
    out = gemv(xs.to(DEVICE), codes.to(DEVICE), quant="int8", scale=scale.to(DEVICE), fast=True)
    torch.testing.assert_close(out.cpu(), ref.int8_linear_fast_ref(xs, codes, scale), rtol=0, atol=0)


# int8's (and W8A8's) M == 1 K loop (kernels/gemv.py, _matmul_fast: a step's words in one tile, the
# next step's prefetched, masked past K; a runtime loop, never unrolled, every load masked, so the
# step count alone changes no code) by (K, BLOCK_K) in codes: one ragged step (BLOCK_K past K), two
# with the last partly past K, three even; BLOCK_K 4: one word a step (five of them).
INT8_STEPS = {"one_ragged": (100, 128), "two_ragged": (200, 128), "three_even": (192, 64), "one_word_a_step": (20, 4)}


# Every K loop form meets every fusion; x's dtype (each its own rounding of the prepared x) pairwise.
@pytest.mark.parametrize("steps,fusion,dtype", with_pairwise(
    [(steps, fusion) for steps in INT8_STEPS for fusion in FUSIONS], [torch.float32, torch.bfloat16, torch.float16]))
def test_fast_int8_k_loop_even_ragged_and_looped(steps, fusion, dtype):
    k, block_k = INT8_STEPS[steps]
    n = 37
    swiglu = FUSIONS[fusion].get("swiglu", False)
    w, scale, _, dense = quant_weight(2 * n if swiglu else n, k, "int8", seed=k)
    x, kw = _fusion_args(1, n, k, dtype, seed=block_k, **FUSIONS[fusion])
    expected = gemv_ref(x, dense.to(DEVICE), swiglu=swiglu, **kw)
    out = gemv(x, _to(w, DEVICE), swiglu=swiglu, quant="int8", scale=_to(scale, DEVICE), fast=True,
               config=(1, 4, block_k, 1), **kw)
    _check(out, expected, True)


@pytest.mark.parametrize("steps", list(INT8_STEPS))
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fast_w8a8_k_loop_even_ragged_and_looped(steps, fusion):
    """W8A8 on int8's K loop (_matmul_fast, its input quantized per code as x is gathered): the
    per-token quantized reference, fp32 (integer codes and inputs, fp32 sums, one rounding)."""
    k, block_k = INT8_STEPS[steps]
    n = 37
    swiglu = FUSIONS[fusion].get("swiglu", False)
    codes, scale, _, _ = quant_weight(2 * n if swiglu else n, k, "int8", seed=k + 1)
    x, kw = _fusion_args(1, n, k, torch.float32, seed=block_k + 1, **FUSIONS[fusion])
    codes, scale = codes.to(DEVICE), scale.to(DEVICE)
    expected = w8a8_gemv_ref(x, codes, scale, swiglu=swiglu, **kw)
    out = gemv(x, codes, swiglu=swiglu, quant="w8a8_int8", scale=scale, fast=True, config=(1, 4, block_k, 1), **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


SM90_FAST_INT8 = """
from experiments.gemv_sass_count import compile_sm90

cases = [  # (K, entry, fusions): FAST_M1_CONFIGS's entry at the Llama-2-7B shapes, a ragged K
    (4096, (8, 4096, 4), dict(NORM=True)),  # qkv: one step
    (4096, (8, 4096, 4), dict(SWIGLU=True)),  # gate_up: two row sets
    (11008, (8, 4096, 4), dict(RESIDUAL=True)),  # down: three steps, the last ragged
    (1540, (8, 1024, 4), dict(NORM=True, HAS_BIAS=True)),  # two steps, the second ragged
]
cases += [(11008, (16, 2048, 4), dict(NORM=True, SWIGLU=True, quant="w8a8_int8"))]  # W8A8: x quantized per code
for k, entry, fusions in cases:
    quant = fusions.pop("quant", "int8")
    cubin, _ = compile_sm90(quant, True, 1, False, 1, 4096, k, entry, fusions)
    assert len(cubin) > 0
print("compiled", len(cases))
"""


def _compile_sm90(script: str) -> str:
    """The script's stdout, run without the interpreter in a fresh process (skips without ptxas)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    if "ptxas" in run.stderr and "No such file" in run.stderr:
        pytest.skip("no bundled ptxas in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_fast_int8_compiles_for_sm90():
    """The fast int8 M == 1 kernel (_matmul_fast) compiles for sm_90 (the interpreter runs what ptxas
    may refuse) at its configs, one step and several, ragged, with two row sets and fusions, and
    W8A8's."""
    assert _compile_sm90(SM90_FAST_INT8).strip().splitlines()[-1] == "compiled 5"


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("weights", ["int8", "int4_g32", "int4_g64_zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rope_store_matches_reference(weights, dtype, m):
    heads, kv_heads, head_dim, k = 6, 2, 16, 192
    n = (heads + 2 * kv_heads) * head_dim
    quant, w, scale, zeros, dense = _weights(weights, n, k, seed=5)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    blocks, block_size = 4, 4
    cache = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    ref_cache = cache.clone()
    angles = torch.arange(64)[:, None] * (1e-2 * torch.arange(1, head_dim // 2 + 1))[None, :]
    kw = dict(norm_weight=(1 + 0.3 * torch.randn(k, generator=g)).to(DEVICE, dtype), eps=1e-5,
              positions=torch.tensor([37, 5, 60][:m]).to(DEVICE),
              cos_table=torch.cat([angles.cos()] * 2, dim=-1).to(DEVICE),
              sin_table=torch.cat([angles.sin()] * 2, dim=-1).to(DEVICE),
              slot_mapping=torch.tensor([6, 1, 13][:m]).to(DEVICE), num_heads=heads, num_kv_heads=kv_heads)
    expected = gemv_rope_store_ref(x, dense.to(DEVICE), k_cache=ref_cache[0], v_cache=ref_cache[1], **kw)
    out = gemv_rope_store(x, _to(w, DEVICE), k_cache=cache[0], v_cache=cache[1], quant=quant,
                          scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE), fast=True, **kw)
    _check(out, expected, m == 1)
    _check(cache, ref_cache, m == 1)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_w8a8_int8_gemv(fusion, dtype):
    """W8A8's numerics do not change (integer codes, fp32 sums, one rounding): the per-token
    quantized reference, as the exact path's test."""
    n, k = 37, 200
    swiglu = FUSIONS[fusion].get("swiglu", False)
    codes, scale, _, _ = quant_weight(2 * n if swiglu else n, k, "int8", seed=7)
    x, kw = _fusion_args(1, n, k, dtype, seed=7, **FUSIONS[fusion])
    codes, scale = codes.to(DEVICE), scale.to(DEVICE)
    expected = w8a8_gemv_ref(x, codes, scale, swiglu=swiglu, **kw)
    out = gemv(x, codes, swiglu=swiglu, quant="w8a8_int8", scale=scale, fast=True, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 1e-2


def test_fast_references_are_the_fp32_dequantization():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    codes = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int8)
    scale, zeros = torch.rand(5, 2, generator=g) + 0.1, torch.randint(-3, 4, (5, 2), generator=g).float()
    w = (codes.float() - zeros.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    want = (x.float() @ w.T).to(torch.bfloat16)
    assert torch.equal(ref.int4_linear_fast_ref(x, ref.pack_int4(codes), scale, zeros), want)
    c8, s8 = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8), torch.rand(5, generator=g)
    assert torch.equal(ref.int8_linear_fast_ref(x, c8, s8), (x.float() @ (c8.float() * s8[:, None]).T).to(torch.bfloat16))


def test_fast_path_fits_and_refuses():
    assert fast_dequant_fits("int4", 4096, 128) and fast_dequant_fits("int8", 4100)
    assert not fast_dequant_fits("int4", 4100, 4)  # K not whole words
    assert not fast_dequant_fits("int4", 96 * 8, 96)  # group not a power of two
    assert not fast_dequant_fits("int8", 4098) and not fast_dequant_fits("dense", 4096)
    w, scale, _, _ = quant_weight(8, 12, "int8")
    with pytest.raises(ValueError, match="whole int32 words"):
        gemv(torch.randn(1, 10).to(DEVICE), _to(w[:, :10].contiguous(), DEVICE), quant="int8",
             scale=_to(scale, DEVICE), fast=True)
    # the config: K steps within K and no narrower than a group, enough programs for the SMs
    assert fast_gemv_config(4096, 4096, "int4", 128) == (1, 8, 2048, 4)
    assert fast_gemv_config(64, 96, "int4", 32)[1:3] == (1, 128)
    assert fast_gemv_config(4096, 64, "int4", 128)[2] == 128


def test_fast_int8_configs_are_the_measured_ones():
    """int8 at M == 1 launches the configs the H200 timed on _matmul_fast at the Llama-2-7B shapes
    (benchmarks/2026-11-30-h200x2-s12/bg/g1/int8_sweep_old.jsonl, "fast": qkv, o_proj and down at
    (1, 8, 4096, 4), gate_up's two row sets at (1, 4, 4096, 4))."""
    assert fast_gemv_config(3 * 4096, 4096, "int8") == (1, 8, 4096, 4)
    assert fast_gemv_config(4096, 4096, "int8") == (1, 8, 4096, 4)
    assert fast_gemv_config(11008, 4096, "int8", two=True) == (1, 4, 4096, 4)
    assert fast_gemv_config(4096, 11008, "int8") == (1, 8, 4096, 4)


@pytest.mark.skipif(not interpreting(), reason="the interpreter resolves the kernel's helpers at call time")
@pytest.mark.parametrize("quant", ["int8", "w8a8_int8", "int4"])
def test_fast_m1_dispatch_int4_alone_takes_the_run_layout(quant, monkeypatch):
    """int8 and W8A8 at M == 1 run _matmul_fast (the per-code gather the H200 timed faster for
    int8), int4 alone _matmul_fast_runs: each path replaced by one that refuses to run."""
    from kernels import gemv as G

    def refuse(name):
        def run(*args, **kwargs):
            raise RuntimeError(f"refused {name}!")  # the interpreter re-raises it wrapped
        return run

    monkeypatch.setattr(G, "_matmul_fast", refuse("_matmul_fast"))
    monkeypatch.setattr(G, "_matmul_fast_runs", refuse("_matmul_fast_runs"))
    w, scale, zeros, _ = quant_weight(8, 64, "int4" if quant == "int4" else "int8", 32, False)
    with pytest.raises(Exception) as refused:
        gemv(torch.randn(1, 64).to(DEVICE), _to(w, DEVICE), quant=quant, scale=_to(scale, DEVICE),
             zero=_to(zeros, DEVICE), fast=True)
    assert f"refused {'_matmul_fast_runs' if quant == 'int4' else '_matmul_fast'}!" in str(refused.value)


@pytest.mark.parametrize("weights", ["int8", "int4_g64_zero"])
def test_fast_past_one_row_is_the_exact_path(weights):
    """``fast`` changes nothing at M > 1 (kernels/gemv.py: a tl.dot variant for int4 there was
    measured slower and removed): bit for bit the exact path's output."""
    quant, w, scale, zeros, _ = _weights(weights, 37, 128, seed=8)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    q = dict(quant=quant, scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE))
    assert torch.equal(gemv(x, _to(w, DEVICE), **q, fast=True), gemv(x, _to(w, DEVICE), **q))
