"""int4 weights -> dense, for prefill: at prefill sizes the matmul is compute bound, so the
weight is dequantized once per call (read K / 2 bytes, write 2K per row: tens of microseconds on
a 7B layer against a millisecond of GEMM at 8k tokens) and cuBLAS does the rest. One launch, no
fp32 temporaries (the torch reference, kernels/quant.py's dequantize_grouped, makes several).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, interpreting, tl, triton

if HAS_TRITON:

    @triton.jit
    def _dequant_int4_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZERO: tl.constexpr,
                             ROUND_BF16: tl.constexpr, TILES: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (k < K)[None, :]
        r = rows.to(tl.int64)[:, None]
        if TILES == 0:  # ours: uint8 [N, K / 2], the even column in the low nibble
            word = tl.load(w_ptr + r * (K // 2) + (k // 2)[None, :], mask=mask, other=0).to(tl.int32)
            shift = ((k % 2) * 4)[None, :]
        else:  # tinygemm's int32 [N / 8, K / (TILES * 16), 32, TILES / 2] (kernels/quant_tinygemm.py)
            b = (k % (TILES * 16)) // 2  # byte of the row within its k super-tile: 16 p + 4 i + c
            lane = (r % 8) * 4 + (b % 4)[None, :]
            index = (((r // 8) * (K // (TILES * 16)) + (k // (TILES * 16))[None, :]) * 32 + lane) * (TILES // 2) \
                + (b // 16)[None, :]
            word = tl.load(w_ptr + index, mask=mask, other=0)
            shift = (((b % 16) // 4) * 4 + (k % 2) * 16)[None, :]
        code = ((word >> shift) & 0xF).to(tl.float32) - 8.0
        g = (k // GROUP)[None, :]
        if HAS_ZERO:
            code -= tl.load(z_ptr + r * (K // GROUP) + g, mask=mask, other=0.0).to(tl.float32)
        w = code * tl.load(s_ptr + r * (K // GROUP) + g, mask=mask, other=0.0).to(tl.float32)
        if ROUND_BF16:  # round to nearest even, as torch's fp32 -> bf16 (the interpreter truncates)
            bits = w.to(tl.uint32, bitcast=True)
            w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(out_ptr + r * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """Triton version of dequantize_grouped(unpack_int4(packed), scale, zero).to(dtype)."""
    return _dequantize(packed, packed.shape[0], packed.shape[1] * 2, 0, scale, zero, dtype)


def dequantize_int4_tinygemm(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                             dtype: torch.dtype) -> torch.Tensor:
    """dequantize_int4 of codes in tinygemm's CUDA layout (int32 [N / 8, K / (T * 16), 32, T / 2],
    kernels/quant_tinygemm.py), with our fp32 [N, G] scale and zero point: the same weight."""
    tiles = weight.shape[3] * 2
    return _dequantize(weight, weight.shape[0] * 8, weight.shape[1] * tiles * 16, tiles, scale, zero, dtype)


def _dequantize(codes: torch.Tensor, n: int, k: int, tiles: int, scale: torch.Tensor, zero: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    group = k // scale.shape[1]
    assert scale.shape == (n, k // group) and (zero is None or zero.shape == scale.shape) and group % 2 == 0
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    block_n, block_k = (4, 64) if interpreting() else (16, 256)
    _dequant_int4_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        codes, scale, zero if zero is not None else scale, out, n, K=k, GROUP=group,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_ZERO=zero is not None, ROUND_BF16=dtype == torch.bfloat16,
        TILES=tiles,
    )
    return out
