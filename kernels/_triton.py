"""Optional Triton import: the torch references work without it (CPU-only installs)."""

import functools
import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a linux dependency
    triton = None
    tl = None
    HAS_TRITON = False



def interpreting() -> bool:
    """Triton's interpreter is on (read at call time: tests switch it on before reloading kernels)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _device_has_pdl(index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_available(device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch (Hopper and newer):
    a launch starts while the kernel before it drains, and waits (griddepcontrol.wait) before
    reading what that kernel wrote. Not under the interpreter; SHRINK_PDL=0 turns it off."""
    if interpreting() or not HAS_TRITON or os.environ.get("SHRINK_PDL", "1") == "0":
        return False
    if getattr(device, "type", device) != "cuda":
        return False
    import torch

    return _device_has_pdl(torch.device(device).index or 0)
