"""W8A8 at prefill sizes (compute bound): the per-token activation quantization in one launch,
and the int8 GEMM with its dequantization fused into the epilogue. The torch references are
kernels/quant.py's quantize_per_token_int8 / _fp8 and w8a8_linear_ref.

What one Llama-2-7B prefill linear at M = 4,080 tokens moves through DRAM around its GEMM, and
what that costs at the H200's measured 4.27 TB/s copy ceiling (MK = M x K input elements, MN =
M x N outputs, NK the weight; gate_up N 22016 K 4096, down N 4096 K 11008). For scale: the GEMM
itself is 736 (gate_up) / 368 (down) GFLOP, 744 / 372 us at bf16's 989 TFLOP/s peak, half that at
the 8-bit peak.

| piece                                                 | launches | bytes          | gate_up        | down           |
|-------------------------------------------------------|----------|----------------|----------------|----------------|
| bf16 F.linear: the GEMM's own reads and write         | 1        | 2MK+2NK+2MN    | 393 MB   92 us | 213 MB   50 us |
| before, int8 quant in torch: .float, abs, amax, /,    | 7 + 4    | 47 MK          | 785 MB  184 us | 2111 MB 494 us |
|   round, clamp, .to(int8) (+ 4 on the [M, 1] scale)   |          |                |                |                |
| before, fp8 quant in torch: .float, abs, amax, /,     | 6 + 4    | 39 MK          | 652 MB  153 us | 1752 MB 410 us |
|   clamp, .to(fp8) (+ 4 on the [M, 1] scale)           |          |                |                |                |
| now: quantize_per_token, one kernel (the second read  | 1        | 3 MK           | 50 MB    12 us | 135 MB   32 us |
|   of each row hits L2; codes + fp32 scales written)   |          |                |                |                |
| before, int8: _int_mm's int32 accumulator, 4 MN bytes | (GEMM)   | +2 MN          | 180 MB   42 us | 33 MB     8 us |
|   written instead of 2 MN of bf16                     |          |                |                |                |
| before, int8: its dequant in torch: .float, * xs,     | 4        | 30 MN          | 2695 MB 631 us | 501 MB  117 us |
|   * scale, .to(dtype)                                 |          |                |                |                |
| bias (Qwen2's qkv; Llama has none): + in torch        | 1        | 4 MN           | (359 MB 84 us) | (67 MB  16 us) |
| now, int8: int8_mm, the GEMM with the dequant (row x  | 1        | MK+NK+2MN      | 287 MB   67 us | 123 MB   29 us |
|   column scale, bias, cast) in its epilogue           |          |                |                |                |
| fp8: torch._scaled_mm, row-wise scales in its         | 1        | MK+NK+2MN      | 287 MB   67 us | 123 MB   29 us |
|   epilogue (unchanged; bias still a torch add)        |          |                |                |                |
| F.pad of the codes to the GEMM's row multiple (8 for  | 0 now    | 2 MK (M not a  | 33 MB     8 us | 90 MB    21 us |
|   _int_mm, 16 for _scaled_mm): now zero rows written  | (was 1)  |  multiple)     |                |                |
|   by the quantize kernel; int8_mm masks instead       |          |                |                |                |
| weight copies per call: none, before or now           | 0        | 0              | -              | -              |

The weight: codes [N, K] row-major from load time. codes.t() is the column-major [K, N] that
torch._scaled_mm requires of mat2; _int_mm hands it to cuBLASLt as a transposed operand (torch
copies only operands that are neither row- nor column-major). A view, no copy per call:
tests/kernels/test_w8a8.py checks the strides. int8_mm reads the codes K-contiguous, the operand
layout 8-bit wgmma wants. Over the 4 linears of a layer (qkv, o, gate_up, down) x 32
layers at 4,080 tokens the torch passes were ~75 ms of DRAM traffic for int8 and ~28 ms for fp8
against a ~117 ms bf16 prefill; the quantize kernel's are ~2 ms. (Measured before: int8 211 ms,
fp8 124 ms. Less these passes, cuBLASLt's int8 GEMMs took about bf16's time, hence int8_mm; the
pieces script times both.) The fused decode GEMVs' quantize
prologue (kernels/gemv.py) does not run here: prefill rows are above SMALL_M.
"""

from __future__ import annotations

import functools

import torch

from kernels._triton import HAS_TRITON, interpreting, tl, triton

if HAS_TRITON:
    from kernels.gemv import _act_scale, _quantize, _rnd

    @triton.jit
    def _fp8_by_hand(v):
        """fp32 v (|v| <= 448) rounded to the nearest e4m3 value (ties to even), kept in fp32:
        the interpreter's fp32 -> fp8 cast drops the carry into the exponent (124.3 -> 64)."""
        bits = v.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        s = v * 512.0  # below 2^-6: subnormals, spaced 2^-9
        r = tl.floor(s + 0.5)
        r = tl.where(((r - s) == 0.5) & ((r % 2) != 0), r - 1.0, r)
        return tl.where(tl.abs(v) < 0.015625, r / 512.0, normal)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                              FP8_BY_HAND: tl.constexpr):
        """One row per program: its absmax over K, then the codes (x read twice, the second time
        from L2). Rows at or past M (the GEMM's padding) come out as zero codes."""
        row = tl.program_id(0)
        ks = tl.arange(0, BLOCK_K)
        limit = tl.where(row < M, K, 0)  # a padding row reads nothing
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            x = tl.load(x_row + k, mask=k < limit, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        xs = _act_scale(tl.max(amax, 0), FP8)
        q_row = q_ptr + row.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            x = tl.load(x_row + k, mask=k < limit, other=0.0).to(tl.float32)
            if FP8:
                v = tl.math.div_rn(x, xs)
                v = tl.minimum(tl.maximum(v, -448.0), 448.0)
                if FP8_BY_HAND:
                    v = _fp8_by_hand(v)
            else:
                v = _quantize(x, xs)
            tl.store(q_row + k, v.to(q_ptr.dtype.element_ty), mask=k < K)
        tl.store(s_ptr + row, xs)

    @triton.jit
    def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                        stride_am, stride_bn, stride_cm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """C = ((A @ B^T) * a_scale[:, None] * b_scale[None, :]).to(dtype) (+ bias, rounded again):
        A int8 [M, K] row-major, B int8 [N, K] row-major (both K-contiguous), exact int32 sums."""
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n  # GROUP_M row tiles sweep the columns together (L2 reuse of B)
        first_m = (pid // width) * GROUP_M
        group_rows = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_rows
        pid_n = (pid % width) // group_rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :]
        b = b_ptr + (rn % N).to(tl.int64)[None, :] * stride_bn + rk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a_tile = tl.load(a, mask=(rk < K - k0)[None, :], other=0)
            b_tile = tl.load(b, mask=(rk < K - k0)[:, None], other=0)
            acc = tl.dot(a_tile, b_tile, acc, out_dtype=tl.int32)
            a += BLOCK_K
            b += BLOCK_K
        dtype = c_ptr.dtype.element_ty
        row_ok, col_ok = rm < M, rn < N
        xs = tl.load(as_ptr + rm, mask=row_ok, other=0.0)
        ws = tl.load(bs_ptr + rn, mask=col_ok, other=0.0)
        y = _rnd(acc.to(tl.float32) * xs[:, None] * ws[None, :], dtype, BF16_BY_HAND)
        if HAS_BIAS:  # the reference adds the bias to the rounded product, in the dtype
            y = _rnd(y + tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :], dtype, BF16_BY_HAND)
        c = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c, y.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def quantize_per_token(x: torch.Tensor, act: str, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_per_token_int8 / _fp8 (act "int8" / "fp8") on x [M, K] (last
    dim contiguous): (codes [rows, K], scale fp32 [rows, 1]), rows >= M (default M) padded with
    zero codes for GEMMs that want a row multiple."""
    m, k = x.shape
    rows = m if rows is None else rows
    if rows < m or x.stride(1) != 1:
        raise ValueError(f"quantize_per_token: x {tuple(x.shape)} (stride {x.stride()}) into {rows} rows")
    dtype = torch.int8 if act == "int8" else torch.float8_e4m3fn
    codes = torch.empty(rows, k, dtype=dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block_k = min(1024 if not interpreting() else 128, triton.next_power_of_2(k))
        _quantize_rows_kernel[(rows,)](x, codes, scale, m, k, x.stride(0), BLOCK_K=block_k, FP8=act == "fp8",
                                       FP8_BY_HAND=interpreting(), num_warps=4)
    return codes, scale


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): Hopper int8 wgmma tiles, largest
# first; int8_mm takes the first with a tile for every SM (a guess until
# experiments/w8a8_prefill_pieces.py --sweep is run on the H200).
INT8_MM_TILES = ((128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4))
INTERPRETER_CONFIG = (16, 32, 32, 2, 4, 1)
# Fewer rows than this (decode batches past the GEMVs' SMALL_M) take torch._int_mm in W8A8Linear:
# memory bound, where cuBLASLt's split-K heuristics are at home (a guess as well: the pieces script
# at --m 32 64 128 256 compares the two).
INT8_MM_MIN_ROWS = 128


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def int8_mm_tile(m: int, n: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """The largest of INT8_MM_TILES that gives each of `sms` SMs a tile of [m, n] (else the smallest)."""
    return next((c for c in INT8_MM_TILES if -(-m // c[0]) * -(-n // c[1]) >= sms), INT8_MM_TILES[-1])


def int8_mm_config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    if interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    return int8_mm_tile(m, n, _sm_count(device.index if device.index is not None else torch.cuda.current_device()))


def int8_mm(xq: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, dtype: torch.dtype,
            config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """W8A8 int8 in one launch: (xq @ codes^T * xs * scale).to(dtype) (+ bias), as
    w8a8_linear_ref after its quantization. xq int8 [M, K], xs fp32 [M, 1] or [M]; codes int8
    [N, K] and scale fp32 [N] as W8A8Linear keeps them (no copy)."""
    m, k = xq.shape
    n = codes.shape[0]
    if codes.shape[1] != k or xq.stride(1) != 1 or codes.stride(1) != 1:
        raise ValueError(f"int8_mm: x {tuple(xq.shape)} and codes {tuple(codes.shape)} (K-contiguous both)")
    out = torch.empty(m, n, dtype=dtype, device=xq.device)
    if m == 0:
        return out
    bm, bn, bk, group, warps, stages = config or int8_mm_config(m, n, xq.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_mm_kernel[grid](xq, codes, out, xs, scale, bias if bias is not None else scale, m, n, k,
                          xq.stride(0), codes.stride(0), out.stride(0),
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, HAS_BIAS=bias is not None,
                          BF16_BY_HAND=interpreting() and dtype == torch.bfloat16,
                          num_warps=warps, num_stages=stages)
    return out
