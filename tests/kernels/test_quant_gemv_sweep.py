"""experiments/quant_gemv_sweep.py on CPU: its candidate configs are ones gemv can run at the 7B
shapes, and its weights are layouts gemv takes (the timings themselves need the GPU)."""

from __future__ import annotations

import pytest
import torch

from experiments.quant_gemv_sweep import FORMATS, SHAPES, candidates, make_weights
from kernels import quant as ref
from kernels.gemv import gemv, gemv_ref


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("group", [1, 64, 128])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_candidates_fit_the_shape(shape, group, m):
    _, k, _ = SHAPES[shape]
    configs = candidates(m, k, group)
    assert configs and len(set(configs)) == len(configs)
    for block_m, block_n, block_k, warps in configs:
        assert block_m == (1 if m == 1 else 16) and warps in (4, 8, 16)
        assert block_k % group == 0 or block_k < group, (shape, group, block_k)
        assert block_k <= max(1024, 1 << (k - 1).bit_length()), (shape, block_k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sweep_weights_are_gemv_layouts(fmt):
    """Each format's weight runs through gemv and equals the reference on its dequantized weight."""
    n, k = 24, 256
    (w, q), = make_weights(fmt, n, k, 1, dev="cpu")[0]
    x = torch.randn(2, k)
    if fmt in ("int8", "w8a8_int8"):
        dense = w.float() * q["scale"][:, None]
    else:
        dense = ref.dequantize_grouped(ref.unpack_int4(w), q["scale"], q["zero"])
    if fmt == "w8a8_int8":
        xq, xs = ref.quantize_per_token_int8(x)
        expected = gemv_ref(xq.float(), w.float()) * xs * q["scale"]
    else:
        expected = gemv_ref(x, dense)
    got = gemv(x, w, **q, pdl=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
