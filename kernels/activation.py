"""SwiGLU: silu(gate) * up on a fused [tokens, 2 * inter] projection, in one pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, tl, triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, x_stride, INTER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + INTER + offs, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # silu rounded to the input dtype, as torch does
        tl.store(out_ptr + row * INTER + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, width = x.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](x, out, x.stride(0), INTER=inter, BLOCK=block)
    return out
