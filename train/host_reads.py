"""Counting reads of tensor values on the host (`.item()`, `float(t)`, `.tolist()`, `if t:` ...).

On a GPU each such read waits for every kernel queued before it, so a read in the middle of a
training step leaves the GPU idle while the host queues the rest. Counted on any device (the CPU
included), which is how tests and experiments/distill_step_cost.py check a step's reads without a GPU."""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = frozenset({torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
                   torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy})
# The CPU AdamW reads each parameter's step count; on a GPU the loop runs the fused optimizer, which reads nothing.
CPU_ONLY = ("torch/optim/",)


class HostReads(TorchFunctionMode):
    """While active, `where` lists each read as 'name file:line' (its caller), CPU_ONLY callers left out."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            frame = traceback.extract_stack(limit=3)[0]
            if not any(part in frame.filename for part in CPU_ONLY):
                self.where.append(f"{func.__name__} {frame.filename}:{frame.lineno}")
        return func(*args, **(kwargs or {}))
