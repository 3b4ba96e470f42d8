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
def _triton_has_pdl() -> bool:
    """Triton 3.4+ has the griddepcontrol intrinsics and the launch_pdl option; older ones do not."""
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _device_has_pdl(index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_available(device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch (Hopper and newer):
    a launch starts while the kernel before it drains, and waits (griddepcontrol.wait) before
    reading what that kernel wrote. Not under the interpreter. (The engine's switch is
    EngineConfig.pdl, which SHRINK_PDL=0 turns off; kernels take it as an argument.)"""
    if interpreting() or not HAS_TRITON or not _triton_has_pdl():
        return False
    if getattr(device, "type", device) != "cuda":
        return False
    import torch

    return _device_has_pdl(torch.device(device).index or 0)


def pdl_launch_args(pdl: bool, device) -> dict:
    """A kernel's PDL constexpr and the matching launch option: on when ``pdl`` and the device has
    it. Off, no launch_pdl is passed at all: Triton before 3.4 does not know the option."""
    on = pdl and pdl_available(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
