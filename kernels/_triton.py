"""Optional Triton import: the torch references work without it (CPU-only installs)."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a linux dependency
    triton = None
    tl = None
    HAS_TRITON = False


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
