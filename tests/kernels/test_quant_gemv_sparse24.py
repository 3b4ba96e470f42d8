"""The 2:4 decode GEMV (kernels/quant_gemv.py) on int4 codes and on 16-bit kept values, both
paths (select at M == 1, dot at M > 1 or exact), against kernels/quant.py's references on random
weights at ragged shapes."""

from __future__ import annotations

import pytest
import torch

from kernels import quant as ref
from kernels.quant_gemv import sparse24_gemv, sparse24_gemv_fits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _to(t, device, dtype=None):
    return None if t is None else t.to(device) if dtype is None else t.to(device, dtype)


def _positions(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random 2-of-4 positions, ascending in each group (compress_24's order): uint8 [n, k / 2]."""
    pos = torch.rand(n, k // 4, 4, generator=g).argsort(dim=-1)[..., :2].sort(dim=-1).values
    return pos.reshape(n, k // 2).to(torch.uint8)


def sparse24_int4_weight(n: int, k: int, group: int, zero: bool, seed: int = 0):
    """Random kept int4 codes at random 2-of-4 positions: (packed, meta, scale, zero)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k // 2), generator=g, dtype=torch.int8)
    positions = _positions(n, k, g)
    scale = (torch.rand(n, k // group, generator=g) + 0.5) / (8 * k**0.5)
    zeros = torch.randint(-3, 4, scale.shape, generator=g).float() if zero else None
    return ref.pack_int4(codes), ref.pack_meta_24(positions), scale, zeros


def sparse24_values_weight(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Random 16-bit kept values at random 2-of-4 positions: (values, meta)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, k // 2, generator=g) / k**0.5).to(dtype)
    return values, ref.pack_meta_24(_positions(n, k, g))


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group,zero", [(32, False), (64, True), (128, True), (128, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_int4_gemv_matches_reference(m, group, zero, dtype):
    n, k = 13, 3 * group  # ragged N, K not a power of two
    packed, meta, scale, zeros = sparse24_int4_weight(n, k, group, zero, seed=m)
    g = torch.Generator().manual_seed(m + 1)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    args = (_to(packed, DEVICE), _to(meta, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE), bias)
    expected = ref.sparse24_int4_linear_ref(x, *args)
    out = sparse24_gemv(x, *args, config=(8, 64, 4))  # several K steps, a ragged last one
    assert out.shape == expected.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 1e-2
        dense = ref.sparse24_int4_dequantize(*args[:4])
        # M == 1: fp32 weights (the fast dequantization); M > 1: rounded to bf16 as the reference
        want = ref.fp32_weight_linear_ref(x, dense, bias) if m == 1 else expected
        assert _rel(out, want) < 4e-3  # summation order only


@pytest.mark.parametrize("group,zero", [(32, True), (128, False)])
def test_sparse24_int4_exact_takes_the_reference_rounding_at_one_row(group, zero):
    packed, meta, scale, zeros = sparse24_int4_weight(21, 2 * group, group, zero, seed=7)
    x = torch.randn(1, 2 * group, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    args = (_to(packed, DEVICE), _to(meta, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE))
    assert _rel(sparse24_gemv(x, *args, exact=True), ref.sparse24_int4_linear_ref(x, *args)) < 4e-3


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("values_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("k", [96, 320])
def test_sparse24_values_gemv_matches_reference(m, values_dtype, x_dtype, k):
    n = 19
    values, meta = sparse24_values_weight(n, k, values_dtype, seed=m + k)
    g = torch.Generator().manual_seed(m + 2)
    x = torch.randn(m, k, generator=g).to(DEVICE, x_dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, x_dtype)
    values, meta = values.to(DEVICE), meta.to(DEVICE)
    expected = ref.sparse24_linear_ref(x, values, meta, bias)
    out = sparse24_gemv(x, values, meta, bias=bias, config=(8, 64, 4))
    assert out.shape == expected.shape and out.dtype == x_dtype
    if x_dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 4e-3  # the kept values are exact in x's dtype: summation order only


@pytest.mark.parametrize("m", [1, 16])
def test_sparse24_gemv_default_configs(m):
    """The default tiles (wider than these shapes: masked) on both formats."""
    values, meta = sparse24_values_weight(40, 512, torch.bfloat16, seed=3)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    torch.testing.assert_close(sparse24_gemv(x, values.to(DEVICE), meta.to(DEVICE)),
                               ref.sparse24_linear_ref(x, values.to(DEVICE), meta.to(DEVICE)), rtol=1e-5, atol=1e-5)
    packed, meta, scale, zeros = sparse24_int4_weight(40, 512, 128, True, seed=5)
    args = (packed.to(DEVICE), meta.to(DEVICE), scale.to(DEVICE), zeros.to(DEVICE))
    torch.testing.assert_close(sparse24_gemv(x, *args), ref.sparse24_int4_linear_ref(x, *args), rtol=1e-5, atol=1e-5)


def test_sparse24_gemv_rejects_what_it_cannot_take():
    values, meta = sparse24_values_weight(8, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        sparse24_gemv(torch.randn(17, 64), values, meta)
    with pytest.raises(ValueError, match="do not fit K"):
        sparse24_gemv(torch.randn(1, 128), values, meta)
    v40, m40 = sparse24_values_weight(8, 40, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32"):
        sparse24_gemv(torch.randn(1, 40), v40, m40)
    packed, meta16, scale, _ = sparse24_int4_weight(8, 64, 16, False)
    with pytest.raises(ValueError, match="group 16"):
        sparse24_gemv(torch.randn(1, 64), packed, meta16, scale)
    assert not sparse24_gemv_fits(64, values.float()) and sparse24_gemv_fits(64, values)
    assert sparse24_gemv_fits(64, packed, 32) and not sparse24_gemv_fits(64, packed, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16])
def test_sparse24_int4_gemv_gpu_real_shape(m):
    packed, meta, scale, zeros = sparse24_int4_weight(11008, 4096, 128, True, seed=3)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)
    args = (packed.cuda(), meta.cuda(), scale.cuda(), zeros.cuda())
    assert _rel(sparse24_gemv(x, *args), ref.sparse24_int4_linear_ref(x, *args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", [(4096, 11008), (22016, 4096)])
def test_sparse24_values_gemv_gpu_real_shapes(m, shape):
    values, meta = sparse24_values_weight(*shape, torch.bfloat16, seed=6)
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(7)).to("cuda", torch.bfloat16)
    values, meta = values.cuda(), meta.cuda()
    assert _rel(sparse24_gemv(x, values, meta), ref.sparse24_linear_ref(x, values, meta)) < 1e-2


SM90_COMPILE = """
import json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import quant_gemv as Q


def compile_sm90(path, int4):
    sig = {"x_ptr": "*bf16", "kept_ptr": "*i32", "meta_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32",
           "b_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32"}
    flags = dict(GROUP=128 if int4 else 32, INT4=int4, FP16=False, HAS_ZERO=int4, HAS_BIAS=True, BF16_BY_HAND=False)
    if path == "select":
        sig["x_ptr"] = "*i64"  # bf16 x as words of four
        kernel, constexprs = Q._sparse24_select_kernel, dict(BLOCK_N=8, BLOCK_U=64, X_WORDS=True, **flags)
    elif path in ("fast", "fast_fused", "rope_store"):
        sig = {"x_ptr": "*bf16", "xw_ptr": "*i32", "w_ptr": "*i32", "m_ptr": "*i16", "s_ptr": "*fp32",
               "z_ptr": "*fp32", "b_ptr": "*bf16", "nw_ptr": "*bf16"}
        flags = {k: v for k, v in flags.items() if k != "INT4"}
        if path == "rope_store":  # the qkv launch: norm prologue, rotary, KV store, PDL
            sig.update(q_ptr="*bf16", pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", k_cache_ptr="*bf16",
                       v_cache_ptr="*bf16", slot_ptr="*i64", eps="fp32", cos_stride="i32", sin_stride="i32")
            kernel, constexprs = Q._sparse24_rope_store_kernel, dict(
                K=4096, Q_HEADS=32, KV_HEADS=32, HALF=64, BLOCK_N=4, BLOCK_K=2048, NORM=True, PDL=True, **flags)
        else:  # "fast_fused": gate_up's norm prologue and SwiGLU, a residual add, PDL
            sig.update(res_ptr="*bf16", out_ptr="*bf16", N="i32", eps="fp32")
            fused = {name: path == "fast_fused" for name in ("NORM", "SWIGLU", "RESIDUAL", "PDL")}
            kernel, constexprs = Q._sparse24_int4_fast_kernel, dict(K=11008, BLOCK_N=8, BLOCK_K=4096, **flags,
                                                                    **fused)
    else:
        sig.update(kept_ptr="*u8" if int4 else "*i32", meta_ptr="*u8", M="i32", x_stride="i32", out_stride="i32")
        kernel, constexprs = Q._sparse24_dot_kernel, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False, **flags)
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    return len(compiled.asm["cubin"])


for path, int4 in json.loads(sys.argv[1]):  # one line each, its size or its error
    try:
        print(json.dumps({"case": [path, int4], "cubin_bytes": compile_sm90(path, int4)}), flush=True)
    except Exception:
        print(json.dumps({"case": [path, int4], "error": traceback.format_exc()[-3000:]}), flush=True)
"""


SM90_CASES = [("select", True), ("select", False), ("dot", True), ("dot", False), ("fast", True),
              ("fast_fused", True), ("rope_store", True)]


@pytest.fixture(scope="module")
def sm90_compiled() -> dict:
    """Every case of SM90_COMPILE compiled in one fresh process without the interpreter (the
    interpreter's kernels cannot be compiled): (path, int4) -> its cubin's size or its error. One
    process, not one per case: each paid for its own torch and Triton start-up."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    run = subprocess.run([sys.executable, "-c", SM90_COMPILE, json.dumps(SM90_CASES)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    errors = run.stderr + "".join(r.get("error", "") for r in lines)
    if "ptxas" in errors and "No such file" in errors:
        pytest.skip("no bundled ptxas in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    return {tuple(r["case"]): r for r in lines}


@pytest.mark.parametrize("path,int4", SM90_CASES)
def test_kernels_compile_for_sm90(sm90_compiled, path, int4):
    """The interpreter runs what the compiler may refuse (constexpr rules, dot operand types):
    both kernels compile for sm_90 with Triton's bundled ptxas, no GPU needed."""
    result = sm90_compiled[path, int4]
    assert "error" not in result, result["error"]
    assert result["cubin_bytes"] > 0


def test_select_path_takes_an_unaligned_bf16_row():
    """bf16 x is read as int64 words: a row starting off an 8-byte boundary is copied first."""
    values, meta = sparse24_values_weight(24, 128, torch.bfloat16, seed=9)
    flat = torch.randn(130, generator=torch.Generator().manual_seed(10)).to(DEVICE, torch.bfloat16)
    x = flat[1:129].view(1, 128)
    assert x.storage_offset() % 4
    values, meta = values.to(DEVICE), meta.to(DEVICE)
    assert _rel(sparse24_gemv(x, values, meta), ref.sparse24_linear_ref(x, values, meta)) < 4e-3


# Every group with and without zero points; x's dtype (its words' reading, the output's rounding)
# pairwise: each dtype meets every group and both zero-point forms.
@pytest.mark.usefixtures("configs_own_block_n")
@pytest.mark.parametrize("group,zero,dtype", [(32, False, torch.bfloat16), (32, True, torch.float16),
                                              (64, False, torch.float16), (64, True, torch.bfloat16),
                                              (128, False, torch.bfloat16), (128, True, torch.float16)])
def test_sparse24_int4_fast_path_matches_fp32_reference(group, zero, dtype):
    """The M == 1 fast path (PRMT-picked inputs, in-place codes): the fp32 weight's product, rounded
    once, on random codes, positions, scales, integral zero points, ragged N, several K steps (a
    ragged last one) and a group spanning several runs or several groups a run. N 13: ragged at
    every config's BLOCK_N (8, 4, 2), few programs for the interpreter to run one at a time."""
    n, k = 13, 5 * group
    packed, meta, scale, zeros = sparse24_int4_weight(n, k, group, zero, seed=group + zero)
    g = torch.Generator().manual_seed(group)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    args = (_to(packed, DEVICE), _to(meta, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE), bias)
    want = ref.fp32_weight_linear_ref(x, ref.sparse24_int4_dequantize(*args[:4]), bias)
    for config in [(8, 128, 4), (4, 64, 4), (2, 32, 4), None]:
        out = sparse24_gemv(x, *args, config=config, path="fast")
        assert out.dtype == dtype
        assert _rel(out, want) < 1e-5, config  # exact codes and inputs: fp32 summation order only
    torch.testing.assert_close(sparse24_gemv(x, *args), sparse24_gemv(x, *args, path="fast"), rtol=0, atol=0)


def test_sparse24_int4_fast_path_no_bias_unaligned_x():
    """Without bias and with x off a 4-byte boundary (read as int32 words: copied first)."""
    packed, meta, scale, _ = sparse24_int4_weight(24, 256, 64, False, seed=11)
    flat = torch.randn(258, generator=torch.Generator().manual_seed(12)).to(DEVICE, torch.bfloat16)
    x = flat[1:257].view(1, 256)
    assert x.storage_offset() % 2
    args = (packed.to(DEVICE), meta.to(DEVICE), scale.to(DEVICE))
    want = ref.fp32_weight_linear_ref(x, ref.sparse24_int4_dequantize(*args, None))
    assert _rel(sparse24_gemv(x, *args, path="fast"), want) < 1e-5


def test_sparse24_paths_by_name():
    """path= picks a path for benchmarks; one that cannot take the call says so."""
    packed, meta, scale, _ = sparse24_int4_weight(8, 64, 32, False)
    with pytest.raises(ValueError, match="path 'fast'"):
        sparse24_gemv(torch.randn(1, 64), packed, meta, scale, path="fast")  # fp32 x
    with pytest.raises(ValueError, match="path 'fast'"):
        sparse24_gemv(torch.randn(2, 64).bfloat16(), packed, meta, scale, path="fast")
    with pytest.raises(ValueError, match="path 'select'"):
        sparse24_gemv(torch.randn(2, 64).bfloat16(), packed, meta, scale, path="select")
    with pytest.raises(ValueError, match="path 'nope'"):
        sparse24_gemv(torch.randn(1, 64).bfloat16(), packed, meta, scale, path="nope")
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = ref.fp32_weight_linear_ref(x, ref.sparse24_int4_dequantize(packed, meta, scale, None))
    for path in ("select", "fast"):
        assert _rel(sparse24_gemv(x, packed, meta, scale, path=path), want) < 4e-3, path


@pytest.mark.parametrize("zero", [False, True])
def test_sparse24_int4_fast_rows_is_the_fast_path_per_row(zero):
    """"fast_rows" (M > 1 on the M == 1 kernel, one launch a row): each row equals that row's own
    fast-path product, bit for bit; fp32 x and exact are refused by name."""
    n, k, group = 20, 256, 64
    packed, meta, scale, zeros = sparse24_int4_weight(n, k, group, zero, seed=21 + zero)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(3, k, generator=g).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    args = (_to(packed, DEVICE), _to(meta, DEVICE), _to(scale, DEVICE), _to(zeros, DEVICE), bias)
    out = sparse24_gemv(x, *args, path="fast_rows")
    assert out.shape == (3, n) and out.dtype == torch.bfloat16
    for row in range(3):
        torch.testing.assert_close(out[row:row + 1], sparse24_gemv(x[row:row + 1], *args, path="fast"), rtol=0, atol=0)
    want = ref.fp32_weight_linear_ref(x, ref.sparse24_int4_dequantize(*args[:4]), bias)
    assert _rel(out, want) < 1e-5
    with pytest.raises(ValueError, match="path 'fast_rows'"):
        sparse24_gemv(x.float(), *args[:4], path="fast_rows")
    with pytest.raises(ValueError, match="path 'fast_rows'"):
        sparse24_gemv(x, *args, path="fast_rows", exact=True)


# CI time (interpreted kernels)

@pytest.fixture
def configs_own_block_n(monkeypatch):
    """The fast path's configs at their own BLOCK_N, columns masked past a ragged N: the H200
    occupancy target (FAST_MIN_PROGRAMS) would cut each to one column a program at these widths,
    programs the interpreter runs one at a time. One column a program (the target's cut) stays
    covered by the other fast-path tests, which take the default config."""
    monkeypatch.setattr("kernels.quant_gemv.FAST_MIN_PROGRAMS", 1)
