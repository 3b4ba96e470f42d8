"""Counting what makes the host wait for the device: reads of tensor values (`.item()`, `float(t)`,
`.tolist()`, `if t:` ...) and blocking copies from the host to a device (`t.to("cuda")` of a CPU
tensor, `torch.tensor(..., device="cuda")`: PyTorch waits for the copy, so for the stream before it).

On a GPU each one waits for every kernel queued before it, so one in the middle of a training step
leaves the GPU idle while the host queues the rest. Reads are counted on any device (the CPU
included), which is how tests and experiments/distill_step_cost.py check a step without a GPU."""

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
        kwargs = kwargs or {}
        if func in READS or blocking_upload(func, args, kwargs):
            frame = traceback.extract_stack(limit=3)[0]
            if not any(part in frame.filename for part in CPU_ONLY):
                self.where.append(f"{getattr(func, '__name__', func)} {frame.filename}:{frame.lineno}")
        return func(*args, **kwargs)


def blocking_upload(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call copies host memory to a device without `non_blocking=True`."""
    if func is torch.tensor:
        return _off_host(kwargs.get("device"))
    if func not in (torch.Tensor.to, torch.Tensor.cuda) or not args or args[0].device.type != "cpu":
        return False
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    if func is torch.Tensor.cuda:
        return True
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    return _off_host(target)


def _off_host(device) -> bool:
    return device is not None and torch.device(device).type != "cpu"
