"""The decode GEMV's split-K (kernels/gemv.py, gemv(split_k=...)): each tile's K in several programs,
the last to arrive summing the partials in a fixed order and running the epilogue. Against the
torch reference on random data at ragged N and K, M = 1..16, dense / int8 / int4 / W8A8 weights,
every fusion, fp32 / bf16 / fp16; deterministic (the same bits on every call), the arrival counts
left at zero, and the refusals."""

from __future__ import annotations

import pytest
import torch

import kernels.gemv as gemv_module
from kernels.gemv import gemv, gemv_ref
from support import with_pairwise
from test_quant_gemv import DEVICE, FUSIONS, _fusion_args, _rel, _to, quant_weight, w8a8_gemv_ref

WEIGHTS = {"dense": ("dense", 0, False), "int8": ("int8", 0, False), "int4_g32_zero": ("int4", 32, True),
           "w8a8_int8": ("w8a8_int8", 0, False)}
TILE = (16, 16, 32, 2)  # small K steps: a 200-wide K makes 7 steps, split 2..4 ways (the last part ragged)


def _case(weights: str, m: int, fusion: str, dtype: torch.dtype, n: int = 37, k: int = 224, seed: int = 0):
    """(x, weight args for gemv, gemv_ref's expected output, fusion kwargs)."""
    quant, group, zero = WEIGHTS[weights]
    swiglu = FUSIONS[fusion].get("swiglu", False)
    rows = 2 * n if swiglu else n
    x, kw = _fusion_args(m, n, k, dtype, seed=seed, **FUSIONS[fusion])
    if quant == "dense":
        w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype) / k**0.5
        return x, dict(weight=w), gemv_ref(x, w, swiglu=swiglu, **kw), kw
    codes, scale, zeros, dense = quant_weight(rows, k, "int8" if quant == "w8a8_int8" else quant, group or 32, zero,
                                              seed=seed)
    args = dict(weight=_to(codes, DEVICE), quant=quant, scale=_to(scale, DEVICE), zero=_to(zeros, DEVICE))
    if quant == "w8a8_int8":
        return x, args, w8a8_gemv_ref(x, args["weight"], args["scale"], swiglu=swiglu, **kw), kw
    return x, args, gemv_ref(x, dense.to(DEVICE, dtype), swiglu=swiglu, **kw), kw


@pytest.mark.parametrize("m,weights,dtype,fusion", with_pairwise(
    [(m, weights, dtype) for m in (1, 2, 5, 16) for weights in WEIGHTS
     for dtype in (torch.float32, torch.bfloat16, torch.float16)],
    list(FUSIONS)))
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_matches_the_reference(m, weights, dtype, fusion, split):
    x, args, expected, kw = _case(weights, m, fusion, dtype, seed=m + split)
    swiglu = FUSIONS[fusion].get("swiglu", False)
    out = gemv(x, args.pop("weight"), swiglu=swiglu, split_k=split, config=(TILE if m > 1 else (1, 8, 32, 2)),
               **args, **kw)
    assert out.shape == expected.shape and out.dtype == dtype and expected.abs().max() > 0
    if dtype == torch.float32 and weights != "w8a8_int8":
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, expected) < 1e-2


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_split_k_is_deterministic_and_leaves_the_counts_at_zero(weights):
    """The partials are summed in their split order by whichever program is last: the same bits on
    every call, close to the unsplit sum (fp32 sums of other groupings), and the arrival counts
    back at zero for the next launch (an in-place residual add, as o_proj / down_proj do)."""
    x, args, _, kw = _case(weights, 16, "residual", torch.float32, seed=4)
    w = args.pop("weight")
    residual = kw.pop("residual")
    outs = []
    for _ in range(3):
        res = residual.clone()
        outs.append(gemv(x, w, residual=res, out=res, split_k=4, config=TILE, **args))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    unsplit = gemv(x, w, residual=residual.clone(), config=TILE, **args)
    torch.testing.assert_close(outs[0], unsplit, rtol=1e-5, atol=1e-5)
    _, count = gemv_module.SPLIT_K_WORKSPACE.get(x.device, 0, 0)
    assert not count.any()


def test_split_k_more_parts_than_steps():
    """Parts past K (split 4 of a 2-step K) sum nothing: the result is still the whole sum."""
    x, args, expected, kw = _case("int8", 3, "norm_bias", torch.float32, k=64, seed=6)
    out = gemv(x, args.pop("weight"), split_k=4, config=TILE, **args, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_split_k_refusals():
    x, args, _, _ = _case("int8", 1, "plain", torch.float32, seed=7)
    w = args.pop("weight")
    with pytest.raises(ValueError, match="split_k 0"):
        gemv(x, w, split_k=0, **args)
    with pytest.raises(ValueError, match="split_k 2"):  # the fast M == 1 path has no split
        gemv(x, w, split_k=2, fast=True, **args)
    with pytest.raises(ValueError, match="split_k 2"):  # batch invariance: one reduction order at every M
        gemv(x, w, split_k=2, batch_invariant=True, **args)
