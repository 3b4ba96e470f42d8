"""RMSNorm as Llama defines it: normalise in fp32, scale by the weight in the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from kernels import rmsnorm as rmsnorm_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_triton: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_triton = use_triton

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With ``residual``: returns (norm(x + residual), x + residual), the pre-norm block's pattern."""
        if self.use_triton:
            return rmsnorm_kernels.rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
