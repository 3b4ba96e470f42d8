"""Quantization primitives: scales/zero points, quantize/dequantize, RTN, for a QuantSpec (scheme.py).

Conventions follow the compressed-tensors format so that what we save is what loaders expect:
signed integers in [-2^(b-1), 2^(b-1)-1]; symmetric scale = absmax / ((2^b - 1) / 2) (GPTQ's
choice: all 2^b levels used, the positive extreme rounds onto the top level), zero point 0;
asymmetric scale = (max - min) / (2^b - 1) with min <= 0 <= max so that 0 is exact, and a signed
integer zero point. Dequantized w = (q - zero) * scale. Groups run along the input dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import SettingError
from shrink.compress.scheme import QuantSpec  # torch-free there, for the config check; imported from here too


@dataclass
class QuantizedWeight:
    """Integer codes (int8 storage, any bit width), scale and zero point [out, groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.spec).to(dtype)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] view."""
    out, inp = w.shape
    g = spec.groups(inp)
    return w.reshape(out, g, inp // g)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point per (row, group) of a [out, in] weight: [out, groups] each."""
    if not spec.fits(w.shape[1]):
        raise SettingError("group_size", f"{spec.group_size} does not divide in_features={w.shape[1]}")
    wg = _grouped(w.float(), spec)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    levels = float((1 << spec.bits) - 1)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (levels / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
    # An all-zero group (e.g. fully pruned) still needs a finite scale.
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    return scale, zero


def _expand(p: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, groups] -> [out, in] by repeating each group's value over its columns."""
    return p.repeat_interleave(in_features // p.shape[1], dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, z = _expand(scale, w.shape[1]), _expand(zero, w.shape[1])
    return torch.clamp(torch.round(w.float() / s) + z, spec.qmin, spec.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, z = _expand(scale, q.shape[1]), _expand(zero, q.shape[1])
    return (q.float() - z) * s


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize one column [out] with its per-row scale/zero [out] (used by GPTQ)."""
    q = torch.clamp(torch.round(w / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with min/max scales."""
    scale, zero = compute_qparams(w, spec)
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)


def quantize_activations_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization (compressed-tensors' formula: absmax / 127.5,
    round half to even, clamp to [-128, 127]) so our in-memory W8A8 matches what loaders run."""
    levels = float((1 << bits) - 1)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / (levels / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 e4m3: (codes as float8_e4m3fn, scale [out, 1])."""
    scale = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    codes = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_activations_per_token(x: torch.Tensor) -> torch.Tensor:
    absmax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = absmax / FP8_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
