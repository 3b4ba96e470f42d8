"""SwiGLU on a fused gate_up projection."""

import torch

from engine.context import get_context
from kernels import activation


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if get_context().use_triton:
        return activation.silu_and_mul(x)
    return activation.silu_and_mul_ref(x)
