"""The interpreter's tl.dot with every output element summed the same way wherever its row sits in
the tile, for the batch-invariance tests.

The interpreter computes tl.dot with numpy's matmul, whose BLAS (OpenBLAS) cuts a 16-row tile into
row panels summed by different micro-kernels: in a 16-row fp32 tile, rows 6-11 came out a few ulps
away from the same rows computed alone (at row 0 of the tile). A GPU's tl.dot computes every element
of a tile by the same instruction sequence (per-thread FMA loops for fp32 IEEE dots, the one MMA
datapath for 16-bit operands), which is what batch-invariant mode rests on (a sequence's token sits
at row i of a decode batch and at row i * (k + 1) + j of a verify). The substitute has that property:
each element's products summed in K order, one K index at a time, then the accumulator added, as
numpy's matmul result was. Other operand types (16-bit raw bits) go to the interpreter's own dot."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


@contextmanager
def row_invariant_dot() -> Iterator[None]:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, w = a.data, b.data
        out = np.zeros(x.shape[:-1] + w.shape[-1:], dtype=np.float32)
        for k in range(x.shape[-1]):
            out += x[..., k : k + 1] * w[..., k : k + 1, :]
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = real
