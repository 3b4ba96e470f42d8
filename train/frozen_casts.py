"""The frozen teacher's Linear weights in the autocast dtype, for the length of a training step.

Autocast caches the cast of a weight only when it requires grad, so the frozen fp32 teacher has each of
its Linear weights cast to bf16 again in every forward: 210 cast kernels and ~1 GB of traffic per step
for SmolLM2-135M (docs/distill_step_cost.md), 13% of the kernels of a compiled step. Cast once, kept
beside the fp32 weights, and swapped in while `active()` lasts: autocast then meets operands already in
its dtype and runs the very same matmuls, bit for bit. Outside the window the teacher is as the caller
gave it (the validation loss runs it without autocast, in fp32). The copies cost half the fp32 bytes of
those weights for the run (0.2 GB for SmolLM2-135M; per forward, autocast made them one layer at a time).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from train.modules import causal_lm


class FrozenCasts:
    """bf16 (or `dtype`) copies of the frozen floating-point nn.Linear weights and biases of `model`'s
    decoder layers (the head is tied to the embedding: the fused loss casts it once per step itself)."""

    def __init__(self, model: torch.nn.Module | None, dtype: torch.dtype | None) -> None:
        self._swaps: list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]] = []
        if model is None or dtype is None:
            return
        for module in causal_lm(model).model.layers.modules():
            if type(module) is not torch.nn.Linear:
                continue
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    self._swaps.append((module, name, p, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)))

    def __len__(self) -> int:
        return len(self._swaps)

    @contextmanager
    def active(self) -> Iterator[None]:
        # Straight into _parameters: a step swaps hundreds of them, and Module.__setattr__'s checks would
        # cost more host time than the casts they replace.
        for module, name, _, cast in self._swaps:
            module._parameters[name] = cast
        try:
            yield
        finally:
            for module, name, original, _ in self._swaps:
                module._parameters[name] = original


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype accelerate's `mixed_precision` autocasts to (None: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))
