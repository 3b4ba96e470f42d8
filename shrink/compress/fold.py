"""Folding a per-input-channel scale s into a model without changing its function: the producer
of x (an RMSNorm weight, or the rows of a previous linear) divides by s, every consumer's weight
columns multiply by s. Shared by AWQ and SmoothQuant."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_scale(prev: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """x -> x / s at the producer, W -> W * s at every consumer: the same function."""
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm-style module: y = weight * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for c in consumers:
        c.weight.mul_(s.unsqueeze(0).to(c.weight.dtype))
