"""Plain-torch references for the engine's compressed linears (the Triton kernels in
kernels/quant_gemv.py are checked against these), and the in-memory layouts they share.

Layouts (output features N, input features K, groups G = K / group_size):
- int8 weight-only and W8A8: codes int8 [N, K], scale [N] (one per output channel).
- int4: codes stored +8 as unsigned nibbles, two per byte along K: packed uint8 [N, K / 2], the
  even column in the low nibble; scale [N, G]; optional zero point [N, G] in the signed domain,
  so w = (code - zero) * scale as compressed-tensors defines it.
- 2:4: in every group of 4 consecutive inputs of a row, 2 are kept: values [N, K / 2] (or int4
  codes of them) and their positions 0..3 within the group, two bits each, four per byte along
  K: meta uint8 [N, K / 8]. A group with fewer than two nonzeros keeps zeros as values.

Activation quantization follows compressed-tensors' dynamic per-token formulas so that the
engine computes what transformers computes on the same checkpoint: int8 scale = absmax / 127.5
(symmetric range over all 256 levels), round(x / scale) half to even, clamp to [-128, 127]; fp8
e4m3 scale = absmax / 448, x / scale cast to float8_e4m3fn. Both divisions are IEEE divisions by
tensors on x's device, as compressed-tensors divides (its ranges are device tensors): torch
computes `cuda_tensor / 127.5` (a Python float: a CPU scalar) as the product with fp32(1 / 127.5)
(aten's BinaryDivTrueKernel.cu), a true division only on the CPU. Written that way the reference's
scale was an ulp off the division in most rows on a GPU (4 in 5 at K 4096), and with it the code
of each such row's absmax element where negative: it sits at -127.5, a rounding tie, by
construction (-128 or -127). The kernels (kernels/w8a8.py, kernels/gemv.py) divide with tl.math.div_rn, so
kernels, reference and compressed-tensors agree bit for bit on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
INT8_HALF_RANGE = 127.5


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes [N, K] (int8 in [-8, 7], K even) -> uint8 [N, K / 2]."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> signed int8 codes [N, K]."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(codes - zero) * scale with [N, G] scale/zero repeated over each group of K (fp32)."""
    group = codes.shape[1] // scale.shape[1]
    w = codes.float()
    if zero is not None:
        w = w - zero.float().repeat_interleave(group, dim=1)
    return w * scale.float().repeat_interleave(group, dim=1)


def int8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8: x @ (codes * scale)^T, the scale applied to the output columns."""
    y = F.linear(x, codes.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int4 per group: the weight dequantized in fp32, rounded once to x's dtype."""
    w = dequantize_grouped(unpack_int4(packed), scale, zero).to(x.dtype)
    return F.linear(x, w, bias)


def fp32_weight_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fast decode path's reference (kernels/gemv.py, fast=True): x times a weight
    dequantized in fp32, the product and bias in fp32, rounded once to x's dtype (no rounding of
    the dequantized weight to x's dtype, unlike int4_linear_ref / int8_linear_ref)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def int8_linear_fast_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8, fast path: fp32_weight_linear_ref on codes * scale (scale [N])."""
    return fp32_weight_linear_ref(x, codes.float() * scale.float().reshape(-1, 1), bias)


def int4_linear_fast_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int4 per group, fast path: fp32_weight_linear_ref on the fp32 dequantization."""
    return fp32_weight_linear_ref(x, dequantize_grouped(unpack_int4(packed), scale, zero), bias)


def token_scale(xf: torch.Tensor, max_code: float) -> torch.Tensor:
    """Each fp32 row's activation scale [M, 1]: its absmax divided by ``max_code`` (127.5 or 448) as
    a tensor on xf's device, an IEEE division on every device (the module docstring; a fill, not a
    copy from the host: capturable in a CUDA graph); eps where the row is all zeros."""
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.full_like(amax, max_code)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: (codes as int8 [M, K], scale fp32 [M, 1])."""
    xf = x.float()
    scale = token_scale(xf, INT8_HALF_RANGE)
    return torch.clamp(torch.round(xf / scale), -128, 127).to(torch.int8), scale


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 e4m3: (codes float8_e4m3fn [M, K], scale fp32 [M, 1])."""
    xf = x.float()
    scale = token_scale(xf, FP8_MAX)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def w8a8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, act: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 (int8 or fp8 codes, per-channel weight scale, dynamic per-token activations):
    quantize x, multiply the codes exactly (fp32 holds every int8 product sum below 2^24 / 2^14
    inputs), scale by the token and channel scales."""
    xq, xs = quantize_per_token_int8(x) if act == "int8" else quantize_per_token_fp8(x)
    y = (F.linear(xq.float(), codes.float()) * xs * scale.float()).to(x.dtype)
    return y if bias is None else y + bias


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 sparse [N, K] -> (kept values [N, K / 2], positions uint8 [N, K / 2] in 0..3, ascending
    within each group). Raises if a group of four holds more than two nonzeros."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError("weight is not 2:4 sparse: a group of 4 inputs holds more than 2 nonzeros")
    # Nonzeros first (stable, in position order), padded with the lowest-index zeros.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    positions = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, positions)
    return values.reshape(n, k // 2), positions.reshape(n, k // 2).to(torch.uint8)


def decompress_24(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(values [N, K / 2], positions [N, K / 2]) -> dense [N, K] with zeros elsewhere."""
    n, half = values.shape
    dense = torch.zeros(n, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions.reshape(n, half // 2, 2).long(), values.reshape(n, half // 2, 2))
    return dense.reshape(n, half * 2)


def pack_meta_24(positions: torch.Tensor) -> torch.Tensor:
    """Positions uint8 [N, K / 2] (0..3) -> 2-bit metadata uint8 [N, K / 8], the first in the low bits."""
    p = positions.to(torch.uint8).reshape(positions.shape[0], -1, 4)
    return p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)


def unpack_meta_24(meta: torch.Tensor) -> torch.Tensor:
    """2-bit metadata uint8 [N, K / 8] -> positions uint8 [N, K / 2]. Device ops only (no tensor
    made from host values: that copy is not allowed inside a CUDA-graph capture)."""
    return torch.stack([(meta >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)


def sparse24_linear_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """2:4 with dense kept values: the weight rebuilt from values + metadata, then a dense matmul."""
    return F.linear(x, decompress_24(values.to(x.dtype), unpack_meta_24(meta)), bias)


def sparse24_int4_dequantize(packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                             zero: torch.Tensor | None) -> torch.Tensor:
    """2:4 + int4 -> dense fp32 [N, K]: kept int4 codes (uint8 [N, K / 4]), their 2-bit positions
    and the [N, G] scales of the dense K (a group of `group_size` inputs keeps group_size / 2 codes)."""
    codes = unpack_int4(packed)  # [N, K / 2] kept codes
    half_group = codes.shape[1] // scale.shape[1]
    w = codes.float()
    if zero is not None:
        w = w - zero.float().repeat_interleave(half_group, dim=1)
    w = w * scale.float().repeat_interleave(half_group, dim=1)
    return decompress_24(w, unpack_meta_24(meta))


def sparse24_int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                             zero: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """2:4 + int4: the weight dequantized in fp32 and rounded once to x's dtype, then a dense matmul."""
    return F.linear(x, sparse24_int4_dequantize(packed, meta, scale, zero).to(x.dtype), bias)
