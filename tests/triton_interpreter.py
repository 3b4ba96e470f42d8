"""Triton's CPU interpreter without its per-call re-patching (test speed only; no change in what runs).

A kernel launch patches triton.language (every builtin rewired to the interpreter) for its whole
grid and restores it at the end. Every call of a @triton.jit helper from inside the kernel patches
it again (`InterpretedFunction.__call__` -> `_patch_lang`), walking all of triton.language with
`inspect.getmembers`; the builtins are already rewired, so that walk changes nothing, and the scope
it returns is dropped. On our GEMV kernels (a helper called per K step, per program) it was more
than half of the interpreted time. Here a helper's call skips it when every language module its
globals hold (triton.language, or triton.language.core for Triton's own helpers such as tl.sum) is
already patched in the running launch, by the launch itself or by an earlier helper's call (whose
patch the interpreter never restores). Anything else (no launch running, a module not yet patched,
no triton.language at all: the interpreter's own assertion) goes through the original.

Two lookups the interpreter repeats per operation are memoized (a profile of the whole suite had them at ~60 of
its ~600 interpreted CPU-seconds): `_get_np_dtype` builds a dict of 19 dtypes on every call (now built once, the
same mapping), and a helper's language modules are found by walking its globals (now once per function).
Every operation also builds block types (`tl.block_type(dtype, shape)`: ~80,000 in one fused GEMV test,
~1.6 of its ~6 interpreted seconds under cProfile), each unwrapping and validating its shape and formatting
its name anew; the shape's part of that is now computed once per shape of plain integers
(`_memoize_block_type`); the same for the shape's tuple type and numel of each `tl.tensor` an operation
returns (`_memoize_tensor_shape`). And every broadcast compares a block's shape with a list of ints
(`tl.tuple.__eq__`), which first rebuilds the list as a `tl.tuple`, types and all (~2.7 of ~26 interpreted
seconds under cProfile in test_spec_rounds' Triton test): for plain ints on both sides the values are
compared directly (`_direct_shape_compare`). Measured without a profiler: 15 interpreted kernel tests
47.0 -> 33.1 s on a shared 2-core CPU. Every integer add, sub and mul below 64 bits also built an overflow check
(int64 casts, the operation again, two comparisons, an and) that `device_assert` then dropped, debug being off
in the interpreter (~27% of test_batch_invariant_engine's interpreted time under cProfile): skipped where it is
dropped (`_skip_dropped_overflow_checks`); test_quant_gemv_sparse24_fused + test_verify_attention 75.3 -> 49.8 s.
"""

from __future__ import annotations

import inspect


def install() -> bool:
    """Wrap the interpreter's `_patch_lang` and launch; False (nothing changed) where this Triton
    lacks them."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return False
    if getattr(interpreter._patch_lang, "_once_per_launch", False):
        return True
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    # One entry per running launch: None until its own patch, then the ids of the modules it patched.
    running: list[set[int] | None] = []

    modules_of: dict = {}  # fn -> the ids of the language modules its globals hold (functions hash by identity)

    def language_modules(fn) -> set[int]:
        if fn not in modules_of:
            modules_of[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        return modules_of[fn]

    def patch_lang_once(fn):
        if running and running[-1] is None:  # the launch's own patch
            scope = patch_lang(fn)
            running[-1] = language_modules(fn)
            return scope
        if not running:
            return patch_lang(fn)
        modules = language_modules(fn)
        if modules and modules <= running[-1]:
            return interpreter._LangPatchScope()  # nothing to restore: the launch restores its own
        scope = patch_lang(fn)  # a helper's patch is never restored: it holds until the launch ends
        running[-1] |= modules
        return scope

    def launch_once(self, *args, **kwargs):
        running.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    _memoize_np_dtype(interpreter)
    _skip_dropped_overflow_checks(interpreter)
    _memoize_block_type()
    _memoize_tensor_shape()
    _direct_shape_compare()
    patch_lang_once._once_per_launch = True
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_once
    return True


def _memoize_block_type() -> None:
    """`tl.block_type.__init__` with the work that depends only on the shape (unwrapping, validation, the
    shape's tuple type, numel, its text in the name) done once per shape of plain ints, after the original
    accepted it; each block type still gets its own element type and its own shape object, equal to what the
    original builds (tests/kernels/test_triton_interpreter_patch.py). Other shapes (constexpr entries, a
    builtin tuple, anything the original refuses) always go through the original."""
    from triton.language import core

    block_type = core.block_type
    original = block_type.__init__
    if getattr(original, "_memoized", False):
        return
    by_shape: dict[tuple, tuple] = {}  # shape ints -> (its tuple type, numel, its text)

    def init(self, element_ty, shape):
        if isinstance(shape, list):
            ints = shape
        elif isinstance(shape, core.tuple):  # a block type's own shape (with_element_ty, to_ir)
            ints = shape.values
        else:
            return original(self, element_ty, shape)  # the original's assertion
        key = tuple(ints)
        plain = all(type(d) is int for d in key)
        found = by_shape.get(key) if plain else None
        if found is None:
            original(self, element_ty, shape)  # raises for a shape it refuses: nothing is kept
            if plain:
                by_shape[key] = (self.shape.type, self.numel, str(self.shape))
            return
        shape_type, self.numel, text = found
        self.element_ty = element_ty
        self.shape = core.tuple(list(key), shape_type)
        self.name = f"<{text}, {element_ty}>"

    init._memoized = True
    init.original = original
    block_type.__init__ = init


def _memoize_tensor_shape() -> None:
    """`tl.tensor.__init__` with its shape's tuple type and numel found once per shape of plain ints (a
    scalar's too); each tensor still gets its own constexprs, shape object and numel, equal to what the
    original builds (tests/kernels/test_triton_interpreter_patch.py). A type that is neither a plain
    block type nor a scalar goes through the original."""
    from triton.language import core

    tensor, block_type = core.tensor, core.block_type
    original = tensor.__init__
    if getattr(original, "_memoized", False):
        return
    by_shape: dict[tuple, tuple] = {}  # shape ints -> (numel, the shape's tuple type)

    def init(self, handle, type):  # (the original's parameter names: callers may pass type=)
        if type.__class__ is block_type:
            key = tuple(type.shape.values)
        elif not type.is_block():
            key = ()
        else:
            return original(self, handle, type)
        plain = all(d.__class__ is int for d in key)
        found = by_shape.get(key) if plain else None
        if found is None:
            original(self, handle, type)
            if plain:
                by_shape[key] = (self.numel.value, self.shape.type)
            return
        numel, shape_type = found
        self.handle = handle
        self.numel = core.constexpr(numel)
        self.type = type
        self.dtype = type.scalar
        self.shape = core.tuple([core.constexpr(s) for s in key], shape_type)

    init._memoized = True
    init.original = original
    tensor.__init__ = init


def _direct_shape_compare() -> None:
    """`tl.tuple.__eq__` answered by comparing the values directly when both sides are plain ints (the
    other side a list): the original normalizes that list into a `tl.tuple` of the same ints and compares
    the values, so the answer (a constexpr of the comparison) is the same
    (tests/kernels/test_triton_interpreter_patch.py). Anything else goes through the original."""
    from triton.language import core

    original = core.tuple.__eq__
    if getattr(original, "_direct", False):
        return

    def eq(self, other):
        if (other.__class__ is list and all(d.__class__ is int for d in other)
                and all(d.__class__ is int for d in self.values)):
            return core.constexpr(self.values == other)
        return original(self, other)

    eq._direct = True
    eq.original = original
    core.tuple.__eq__ = eq


def _skip_dropped_overflow_checks(interpreter) -> None:
    """`TritonSemantic.binary_op_sanitize_overflow_impl` returns at once for the interpreter's builder when its
    options have debug off (the interpreter never turns it on): every integer add, sub and mul of fewer than
    64 bits otherwise casts both sides to int64, redoes the operation, compares it with the type's bounds and
    hands the condition to `device_assert`, which drops it unless debug is on; nothing else reads it, so the
    answer is the same (tests/kernels/test_triton_interpreter_patch.py). A compiling builder, or debug on,
    goes through the original."""
    from triton.language.semantic import TritonSemantic

    original = TritonSemantic.binary_op_sanitize_overflow_impl
    if getattr(original, "_skipped", False):
        return
    builder = interpreter.interpreter_builder

    def sanitize(self, lhs, rhs, binary_op):
        if self.builder is builder and not builder.options.debug:
            return None
        return original(self, lhs, rhs, binary_op)

    sanitize._skipped = True
    sanitize.original = original
    TritonSemantic.binary_op_sanitize_overflow_impl = sanitize


def _memoize_np_dtype(interpreter) -> None:
    """The interpreter's `_get_np_dtype` with its table built once (it builds it per call): each dtype's
    answer is the original's, asked once (tests/kernels/test_triton_interpreter_patch.py)."""
    import numpy as np
    import triton.language as tl

    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "_memoized", False):
        return
    table: dict = {}

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.pointer_type):
            return np.dtype(np.uint64)
        if isinstance(tt_dtype, tl.block_type):
            if isinstance(tt_dtype.element_ty, tl.pointer_type):
                return np.dtype(np.uint64)
            tt_dtype = tt_dtype.element_ty
        found = table.get(tt_dtype)
        if found is None:
            found = table[tt_dtype] = original(tt_dtype)  # the original's answer, or its KeyError
        return found

    get_np_dtype._memoized = True
    get_np_dtype.original = original
    interpreter._get_np_dtype = get_np_dtype
