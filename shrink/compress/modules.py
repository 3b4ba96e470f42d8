"""Compressed linears as module swaps (after gpt-fast): `QuantLinear` replaces `nn.Linear` through
one `replace_linears(model, make)` walk. Pruned linears stay plain `nn.Linear` with zeros (the
2:4 matmul is the engine's business); their masks travel beside the model.

A QuantLinear keeps the integer (or fp8) codes, scales and zero points it will be saved with, and
computes with their dequantized weight, so in-memory evaluation is exactly what a loader of the
saved file computes. `act` adds dynamic per-token activation quantization (W8A8 int8 or fp8).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shrink.compress.quant import (QuantizedWeight, QuantSpec, fp8_activations_per_token,
                                   quantize_activations_per_token)


class QuantLinear(nn.Module):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 spec: QuantSpec | None, bias: torch.Tensor | None, act: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.spec = spec  # None: fp8 e4m3 codes with one scale per output channel
        self.act = act
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero if zero is not None else torch.zeros_like(scale))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        # The dequantized weight is computed once; it is derived state, never saved.
        self.register_buffer("weight", self.dequantized().to(dtype), persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, act: str | None = None,
                       dtype: torch.dtype = torch.float32) -> "QuantLinear":
        return cls(qw.q, qw.scale, qw.zero, qw.spec, bias, act, dtype)

    @property
    def bits(self) -> int:
        return self.spec.bits if self.spec is not None else 8

    def dequantized(self) -> torch.Tensor:
        if self.spec is None:
            return self.codes.float() * self.scale
        return QuantizedWeight(self.codes, self.scale, self.zero, self.spec).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "int8":
            x = quantize_activations_per_token(x)
        elif self.act == "fp8":
            x = fp8_activations_per_token(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        kind = f"int{self.spec.bits} g{self.spec.group_size}" if self.spec else "fp8"
        return f"{self.in_features}, {self.out_features}, {kind}, act={self.act}"


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None],
                    prefix: str = "") -> int:
    """Swap every nn.Linear for `make(full_name, linear)` unless it returns None. Returns count."""
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    n = 0
    for name, linear in swaps:
        new = make(prefix + name, linear)
        if new is not None:
            set_module(model, name, new)
            n += 1
    return n
