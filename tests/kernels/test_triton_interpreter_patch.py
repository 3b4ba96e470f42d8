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


def _built(init, element_ty, shape):
    """(element type, shape values, shape type, numel, name) of a block type built by `init`, or the error."""
    block = object.__new__(tl.block_type)
    try:
        init(block, element_ty, shape)
    except Exception as e:  # noqa: BLE001 (the error itself is the answer compared)
        return type(e), str(e)
    return (block.element_ty, type(block.shape), list(block.shape.values), block.shape.type, block.numel, block.name)


def test_memoized_block_type_answers_as_the_original_for_every_shape_it_is_given():
    assert triton_interpreter.install()
    patched = tl.block_type.__init__
    original = patched.original
    core = tl.core
    shapes = [[4, 8], [16], [1, 32, 2], [4, 8], core.tuple([4, 8]), core.tuple([64]),  # repeats answer from the memo
              [tl.constexpr(4), 8], [], [3, 8], [4, 8.0], [True], (4, 8), [2 ** 21]]    # the original decides these
    for element_ty in (tl.float32, tl.bfloat16, tl.pointer_type(tl.int8), tl.int1):
        for _ in range(2):
            for shape in shapes:
                assert _built(patched, element_ty, shape) == _built(original, element_ty, shape), (element_ty, shape)
    a, b = tl.block_type(tl.float16, [4, 8]), tl.block_type(tl.float16, [4, 8])
    assert a == b and a.shape is not b.shape  # equal, and each its own shape object
    assert a.with_element_ty(tl.float32) == tl.block_type(tl.float32, [4, 8])


def _tensor_built(init, handle, ty):
    """Everything a tl.tensor built by `init` holds, its shape and numel as (class, value) pairs."""
    t = object.__new__(tl.tensor)
    init(t, handle, ty)
    constant = lambda c: (type(c), c.value)  # noqa: E731
    return (sorted(vars(t)), t.handle, t.type, t.dtype, constant(t.numel), type(t.shape),
            [constant(s) for s in t.shape], t.shape.type)


def test_memoized_tensor_shape_answers_as_the_original_for_blocks_scalars_and_pointers():
    assert triton_interpreter.install()
    patched = tl.tensor.__init__
    original = patched.original
    types = [tl.block_type(tl.float32, [4, 8]), tl.block_type(tl.bfloat16, [4, 8]), tl.block_type(tl.int8, [64]),
             tl.block_type(tl.pointer_type(tl.float16), [2, 16]), tl.float32, tl.int1, tl.pointer_type(tl.int32),
             tl.block_type(tl.float32, [1, 1, 32])]
    handle = object()
    for _ in range(2):  # the second pass answers from the memo
        for ty in types:
            assert _tensor_built(patched, handle, ty) == _tensor_built(original, handle, ty), ty
    a, b = tl.tensor(handle, types[0]), tl.tensor(handle, types[0])
    assert a.shape is not b.shape and a.numel is not b.numel  # each tensor its own objects


def _compared(eq, left, right):
    try:
        out = eq(left, right)
    except Exception as e:  # noqa: BLE001 (the error itself is the answer compared)
        return type(e), str(e)
    return type(out), out.value


def test_direct_shape_compare_answers_as_the_original():
    assert triton_interpreter.install()
    patched = tl.tuple.__eq__
    original = patched.original
    c = tl.constexpr
    lefts = [tl.tuple([4, 8]), tl.tuple([64]), tl.tuple([1, 32, 2]), tl.tuple([c(4), c(8)]), tl.tuple([True]),
             tl.tuple([])]
    rights = [[4, 8], [8, 4], [4], [64], [1, 32, 2], [1, 32], [], [c(4), 8], [True], [1], [4.0, 8], [[4], 8],
              (4, 8), tl.tuple([4, 8]), c(4)]
    for left in lefts:
        for right in rights:
            answer = _compared(original, left, right)
            assert _compared(patched, left, right) == answer, (left, right)
            if answer[0] is tl.constexpr:  # `!=` (each broadcast's question) is the negation of that answer
                assert (left != right) is (not answer[1]), (left, right)


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


def _int32_block(values) -> tl.tensor:
    import numpy as np

    return tl.tensor(interpreter.TensorHandle(np.array(values, dtype=np.int32), tl.int32),
                     tl.block_type(tl.int32, [len(values)]))


def test_skipped_overflow_checks_are_the_ones_device_assert_drops(monkeypatch):
    """The original's whole effect for an int32 add, sub or mul is the condition it hands to device_assert,
    which drops it with debug off (the interpreter's options: never turned on): the patch skips it there; with
    debug on it runs the original, whose assertion then fails on an overflow."""
    import dataclasses

    from triton.language.semantic import TritonSemantic

    assert triton_interpreter.install()
    patched = TritonSemantic.binary_op_sanitize_overflow_impl
    original = patched.original
    semantic = interpreter.interpreter_semantic
    assert semantic.builder is interpreter.interpreter_builder and not semantic.builder.options.debug
    handed = []
    real_assert = TritonSemantic.device_assert
    monkeypatch.setattr(TritonSemantic, "device_assert",
                        lambda self, cond, msg, mask: handed.append((msg, real_assert(self, cond, msg, mask))))
    lhs, rhs = _int32_block([1, 2 ** 31 - 1, -5, 0]), _int32_block([1, 1, 7, -3])
    for op in (semantic.add, semantic.sub, semantic.mul):
        assert original(semantic, lhs, rhs, op) is None
        assert handed.pop() == (f"int32 overflow detected for operation {op.__name__}", None)  # built, dropped
        assert patched(semantic, lhs, rhs, op) is None and not handed
    monkeypatch.setattr(semantic.builder, "options", dataclasses.replace(semantic.builder.options, debug=True))
    with pytest.raises(AssertionError, match="int32 overflow detected for operation add"):  # 2**31 - 1 + 1
        patched(semantic, lhs, rhs, semantic.add)


@triton.jit
def _int_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs, mask=mask)
    tl.store(dst + offs, (x * 3 - offs) + 7, mask=mask)


def test_int32_arithmetic_of_a_kernel_matches_torch():
    assert triton_interpreter.install()
    src = torch.randint(-1000, 1000, (301,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    dst = torch.empty_like(src)
    _int_kernel[(triton.cdiv(301, 64),)](src, dst, 301, BLOCK=64)
    assert torch.equal(dst, src * 3 - torch.arange(301, dtype=torch.int32) + 7)
