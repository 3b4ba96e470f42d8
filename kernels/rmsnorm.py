"""Fused residual add + RMSNorm: one read of x (and residual), one write of each output.

Llama's RMSNorm normalises in fp32, casts back to the input dtype, then scales by the weight;
the kernel keeps that order so bf16 results round the same way.
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, next_pow2, tl, triton


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, eps, x_stride, res_stride,
        N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
            tl.store(res_out_ptr + row * N + offs, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, 0) / N
        h = (h * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * N + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rmsnorm_ref over the last dim; x may have any leading shape."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(out)
    else:
        r2, res_out = x2, out  # unused
    if rows:
        _rmsnorm_kernel[(rows,)](
            x2, r2, out, res_out, weight, eps, x2.stride(0), r2.stride(0),
            N=n, BLOCK=next_pow2(n), HAS_RESIDUAL=residual is not None, num_warps=4 if n <= 4096 else 8,
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)
