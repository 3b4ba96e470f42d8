"""2:4 sparse + int4 decode GEMV (the idea of Sparse-Marlin): y = x @ W^T + b for x [M <= 16, K]
where W [N, K] is stored as its kept half only, int4 codes two per byte (uint8 [N, K / 4]), plus
2-bit positions four per byte (uint8 [N, K / 8]), with per-group scales / zero points [N, K / G]
of the dense K (kernels/quant.py's layout and reference, sparse24_int4_linear_ref).

Each program streams the kept codes and positions of a few output rows once (K / 4 + K / 8
bytes per row instead of int4's K / 2), dequantizes them in registers and gathers the matching
x columns (x is small and stays in cache).
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, interpreting, next_pow2, tl, triton

SMALL_M = 16


if HAS_TRITON:

    @triton.jit
    def _sparse24_int4_kernel(
        x_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, x_stride, out_stride,
        N: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
        HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        HALF_K: tl.constexpr = K // 2  # kept values per row
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        c = cols.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j0 in range(0, HALF_K, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)  # kept-value index within the row
            mask = col_mask[:, None] & (j < HALF_K)[None, :]
            byte = tl.load(w_ptr + c * (K // 4) + (j // 2)[None, :], mask=mask, other=0).to(tl.int32)
            code = ((byte >> ((j % 2) * 4)[None, :]) & 0xF).to(tl.float32) - 8.0
            meta = tl.load(meta_ptr + c * (K // 8) + (j // 4)[None, :], mask=mask, other=0).to(tl.int32)
            pos = (meta >> ((j % 4) * 2)[None, :]) & 3
            k = (j // 2 * 4)[None, :] + pos  # the input this value multiplies [BLOCK_N, BLOCK_J]
            g = (j // (GROUP // 2))[None, :]
            if HAS_ZERO:
                code -= tl.load(z_ptr + c * (K // GROUP) + g, mask=mask, other=0.0).to(tl.float32)
            w = code * tl.load(s_ptr + c * (K // GROUP) + g, mask=mask, other=0.0).to(tl.float32)
            if ROUND_BF16:  # the reference rounds the dequantized weight to bf16 (ties to even)
                bits = w.to(tl.uint32, bitcast=True)
                w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None, None] * x_stride + k[None, :, :],
                        mask=row_mask[:, None, None] & mask[None, :, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * w[None, :, :], 2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def sparse24_int4_gemv(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor | None, bias: torch.Tensor | None = None,
                       block_n: int = 4, block_j: int = 256) -> torch.Tensor:
    """Triton version of sparse24_int4_linear_ref for x [M <= 16, K] (fp32 or bf16)."""
    m, k = x.shape
    n = packed.shape[0]
    assert m <= SMALL_M and packed.shape == (n, k // 4) and meta.shape == (n, k // 8) and k % 8 == 0
    assert x.dtype in (torch.float32, torch.bfloat16), x.dtype
    group = k // scale.shape[1]
    assert scale.shape == (n, k // group) and group % 4 == 0 and (zero is None or zero.shape == scale.shape)
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _sparse24_int4_kernel[(triton.cdiv(n, block_n),)](
        x, packed, meta, scale, zero if zero is not None else scale, bias if bias is not None else scale, out,
        m, x.stride(0), out.stride(0),
        N=n, K=k, GROUP=group, BLOCK_M=max(1, next_pow2(m)), BLOCK_N=block_n,
        BLOCK_J=min(block_j, next_pow2(k // 2)),
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        ROUND_BF16=x.dtype == torch.bfloat16,
        num_warps=4 if not interpreting() else 1,
    )
    return out
