"""SwiGLU on a fused gate_up projection."""

import torch

from kernels import activation


def silu_and_mul(x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    if use_triton:
        return activation.silu_and_mul(x)
    return activation.silu_and_mul_ref(x)
