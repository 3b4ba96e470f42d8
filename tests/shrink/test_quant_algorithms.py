"""Quantization primitives and algorithms on tiny layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ShrinkError, config_section
from shrink.compress.compressed_tensors_io import pack_int32, unpack_int32
from shrink.compress.fold import fold_scale
from shrink.compress.hessian import Hessian
from shrink.compress.methods.awq import search_scale
from shrink.compress.methods.gptq import gptq_quantize
from shrink.compress.methods.smoothquant import smooth_scale
from shrink.compress.quant import (QuantSpec, compute_qparams, dequantize, fp8_weight, quantize,
                                   quantize_activations_per_token, rtn)
from shrink.compress.sparsity import nm_keep_mask


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.rand(d, generator=g) * 3 + 0.1
    return (torch.randn(n, d, generator=g) @ mix) * scales


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, None, True), (3, 16, False),
                                            (4, None, True)])
def test_quant_dequant_round_trip(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.rand(8, 1) * 4
    spec = QuantSpec(bits, group, sym)
    qw = rtn(w, spec)
    assert qw.q.dtype == torch.int8
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    deq = qw.dequantize()
    # Error at most half a step (plus the one clipped top level of the symmetric grid).
    step = qw.scale.repeat_interleave(64 // qw.scale.shape[1], dim=1)
    assert ((deq - w).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all()
    # Quantizing dequantized values gives back the same codes (the grid is a fixed point).
    assert torch.equal(quantize(deq, qw.scale, qw.zero, spec), qw.q)
    # Zero is exactly representable (pruned weights stay zero).
    w0 = w.clone()
    w0[:, ::4] = 0
    assert (rtn(w0, spec).dequantize()[:, ::4] == 0).all()


def test_bad_quant_settings_name_the_key():
    with pytest.raises(ShrinkError, match="quantize.bits"), config_section("quantize"):
        QuantSpec(5, 128)
    with pytest.raises(ShrinkError, match="group_size"):
        compute_qparams(torch.randn(4, 48), QuantSpec(4, 32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 96), dtype=torch.int8)
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 96 * bits // 32)
    assert torch.equal(unpack_int32(packed, bits, 96), q)
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(packed, helpers.pack_to_int32(q, bits))


@pytest.mark.parametrize("act_order,group", [(False, 16), (True, 16), (True, None)])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, group):
    torch.manual_seed(0)
    d = 64
    w = torch.randn(48, d)
    x = correlated_inputs(3000, d)
    h = Hessian(d, torch.device("cpu"))
    h.add(x)
    spec = QuantSpec(4, group, True)
    ref = x @ w.t()
    err_rtn = (x @ rtn(w, spec).dequantize().t() - ref).pow(2).mean()
    qw = gptq_quantize(w, h.matrix(), spec, act_order=act_order, block_size=32)
    err_gptq = (x @ qw.dequantize().t() - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax


def test_gptq_lazy_blocks_equal_column_by_column():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    h = Hessian(32, torch.device("cpu"))
    h.add(correlated_inputs(500, 32, seed=1))
    spec = QuantSpec(4, 8, False)
    a = gptq_quantize(w, h.matrix(), spec, act_order=False, block_size=8)
    b = gptq_quantize(w, h.matrix(), spec, act_order=False, block_size=32)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), atol=1e-4, rtol=0)


def test_gptq_keeps_pruned_weights_zero():
    torch.manual_seed(2)
    w = torch.randn(16, 32)
    keep = nm_keep_mask(w.abs(), 2, 4)
    h = Hessian(32, torch.device("cpu"))
    h.add(correlated_inputs(500, 32, seed=2))
    for sym in (True, False):
        qw = gptq_quantize(w * keep, h.matrix(), QuantSpec(4, 16, sym), keep=keep)
        assert (qw.dequantize()[~keep] == 0).all()


def test_awq_fold_preserves_function_and_search_is_no_worse_than_plain_rtn():
    torch.manual_seed(3)
    norm_w = nn.Parameter(torch.rand(32) + 0.5)
    norm = nn.Module()
    norm.weight = norm_w
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(256, 32) * (torch.rand(32) * 5)  # a few loud channels
    before = lin(x * norm.weight)
    spec = QuantSpec(4, 16, True)
    s, ratio, err = search_scale(x * norm.weight, [lin.weight], spec, (x * norm.weight).abs().mean(0), grid=10)
    fold_scale(norm, [lin], s)
    torch.testing.assert_close(lin(x * norm.weight), before, atol=1e-4, rtol=1e-4)
    xin = (x * norm.weight).detach()
    ref = before.detach()
    plain = ((xin * s) @ rtn(lin.weight.detach() / s, spec).dequantize().t() - ref).pow(2).mean() / ref.pow(2).mean()
    assert err <= float(plain) + 1e-6  # ratio 0 (no scaling) is in the grid


def test_smoothquant_reduces_w8a8_error_with_outlier_channels():
    torch.manual_seed(4)
    d = 64
    w = torch.randn(32, d) * 0.1
    x = torch.randn(512, d)
    x[:, :3] *= 60.0  # activation outliers
    ref = x @ w.t()

    def w8a8(xx, ww):
        return quantize_activations_per_token(xx) @ rtn(ww, QuantSpec(8, None, True)).dequantize().t()

    plain = (w8a8(x, w) - ref).pow(2).mean()
    s = smooth_scale(x.abs().amax(0), [w], alpha=0.5)
    smooth = (w8a8(x / s, w * s) - ref).pow(2).mean()
    assert smooth < 0.5 * plain


def test_fp8_weight_round_trip():
    torch.manual_seed(5)
    w = torch.randn(8, 32)
    codes, scale = fp8_weight(w)
    assert codes.dtype == torch.float8_e4m3fn
    rel = ((codes.float() * scale - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 0.07  # 3 mantissa bits: relative error below 2^-4 for normal values


def test_activation_quantization_is_per_token():
    x = torch.randn(4, 16) * torch.tensor([[1.0], [10.0], [100.0], [0.01]])
    xq = quantize_activations_per_token(x)
    err = (xq - x).abs().amax(dim=1) / x.abs().amax(dim=1)
    assert (err <= 0.5 / 127.5 + 1e-6).all()
    assert dequantize(torch.zeros(1, 4, dtype=torch.int8), torch.ones(1, 1), torch.zeros(1, 1),
                      QuantSpec(8, None)).abs().sum() == 0


def paper_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None, sym: bool, act_order: bool,
               damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ as the paper states it, plainly, in float64 (Frantar et al. 2022, Algorithm 1 without the
    lazy blocks, as OBQ's column loop): dead inputs are zeroed, H is damped by damp * mean(diag H);
    columns go left to right (or by decreasing diag H with act_order); column i is rounded to its
    grid, and its error e = (w_i - q_i) / [H^-1]_ii updates the columns not yet quantized by
    W[:, j] -= e * [H^-1]_ij; then H^-1 loses row and column i by Gaussian elimination,
    H^-1 <- H^-1 - H^-1[:, i] H^-1[i, :] / [H^-1]_ii (OBQ's inverse update, the same numbers as
    walking the upper Cholesky factor of H^-1). Grid: per row (and group of `group` inputs),
    symmetric scale max|w| / ((2^b - 1) / 2) or asymmetric (max - min) / (2^b - 1) with 0 exact;
    group scales are taken from the updated weights when the walk reaches a group, or, with
    act_order, from the original weights up front. Returns the dequantized weight, and which rows
    met a rounding decision within 1e-6 of a tie (there float32 and float64 may round apart: with
    a symmetric grid taken from the current weights, the group's extreme sits exactly on one)."""
    w = w.double().clone()
    h = h.double().clone()
    out, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    qmin, qmax, levels = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2**bits - 1
    gs = group or cols

    def grid(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = block.min(dim=1).values.clamp(max=0)
        hi = block.max(dim=1).values.clamp(min=0)
        if sym:
            return torch.maximum(-lo, hi) / (levels / 2), torch.zeros(out, dtype=torch.float64)
        scale = (hi - lo) / levels
        return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)

    scales = {g: grid(w[:, g * gs:(g + 1) * gs]) for g in range(cols // gs)} if (act_order or group is None) else {}
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(cols))
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    tie = torch.zeros(out, dtype=torch.bool)
    done: list[int] = []
    for i in order:
        g = i // gs
        if g not in scales:  # first column of a group reached in order (act_order=False)
            scales[g] = grid(w[:, g * gs:(g + 1) * gs])
        s, z = scales[g]
        t = w[:, i] / s
        apart = torch.clamp(t.floor() + z, qmin, qmax) != torch.clamp(t.floor() + 1 + z, qmin, qmax)
        tie |= ((t - t.floor() - 0.5).abs() < 1e-6) & apart
        q[:, i] = (torch.clamp(torch.round(t) + z, qmin, qmax) - z) * s
        e = (w[:, i] - q[:, i]) / hinv[i, i]
        rest = [j for j in order if j not in done and j != i]
        w[:, rest] -= e.unsqueeze(1) * hinv[i, rest].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
        done.append(i)
    return q, tie


@pytest.mark.parametrize("act_order,group,sym", [(False, None, True), (False, 16, True), (False, 16, False),
                                                 (True, 16, True), (True, None, False)])
def test_gptq_equals_the_papers_column_loop(act_order, group, sym):
    g = torch.Generator().manual_seed(11)
    d = 48
    w = torch.randn(24, d, generator=g) * (torch.rand(24, 1, generator=g) + 0.5)
    a = torch.randn(d, d, generator=g)
    h = a @ a.t() / d + torch.diag(torch.rand(d, generator=g) * 4)  # a random SPD Hessian, uneven diagonal
    spec = QuantSpec(4, group, sym)
    ours = gptq_quantize(w, h, spec, act_order=act_order, block_size=16).dequantize().double()
    ref, tie = paper_gptq(w, h, 4, group, sym, act_order)
    assert tie.float().mean() <= 0.25  # the few rows float precision may decide; every other row must agree
    torch.testing.assert_close(ours[~tie], ref[~tie], atol=1e-5, rtol=0)
