"""tests/triton_interpreter.py speeds the CPU interpreter up; it must not change an answer."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import triton_interpreter  # noqa: E402

DTYPES = [tl.int1, tl.float16, tl.float32, tl.float64, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32,
          tl.int64, tl.uint64, tl.bfloat16, tl.float8e5, tl.float8e4nv]


def test_memoized_np_dtype_answers_as_the_original_for_scalars_blocks_and_pointers():
    assert triton_interpreter.install()
    patched = interpreter._get_np_dtype
    original = patched.original
    cases = DTYPES + [tl.block_type(d, [4, 8]) for d in DTYPES] + [tl.pointer_type(tl.float16),
                                                                   tl.block_type(tl.pointer_type(tl.int8), [16])]
    for _ in range(2):  # the second pass answers from the table
        for case in cases:
            assert patched(case) == original(case), case
    with pytest.raises(KeyError):
        patched(tl.void)  # what the original raises for a type it has no array for


@triton.jit
def _double(x):
    return x * 2


@triton.jit
def _helper_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs, mask=mask).to(tl.float32)
    tl.store(dst + offs, _double(x) + 1.0, mask=mask)  # exact in fp32 for bf16 x


def test_a_kernel_calling_a_helper_per_program_matches_torch():
    assert triton_interpreter.install()
    src = torch.randn(301, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dst = torch.empty(301)
    _helper_kernel[(triton.cdiv(301, 64),)](src, dst, 301, BLOCK=64)
    assert torch.equal(dst, src.float() * 2 + 1.0)
