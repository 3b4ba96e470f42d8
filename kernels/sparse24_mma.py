"""Tensor-core 2:4 + int4 weight-only GEMM for decode (1 <= M <= 16): y = x @ W^T (+ bias).

DOCSTRING_PLACEHOLDER
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import int4_mma as mma
from kernels.gemv import SplitKWorkspace
from kernels.quant import unpack_meta_24

BLOCK = 32  # dense inputs per position word: 8 groups of 4, four lanes' two groups each
ZERO_RANGE = (-8, 7)  # integer zero points the fill nibble 8 + zero takes (int4's)


@dataclass(frozen=True)
class Sparse24MMAWeight:
    """A 2:4 + int4 weight for sparse24_mma: packed uint8 [N, K / 4] (kernels/quant.py's kept codes, as
    they are: read as int16, a lane's two groups), meta_words int32 [N, K / 32] (repack_sparse24's
    position words), scale fp32 [N, K / group], zero_bias int32 [N, K / group] ((8 - zero) in both
    16-bit halves, as int4_mma's) or None."""

    packed: torch.Tensor
    meta_words: torch.Tensor
    scale: torch.Tensor
    zero_bias: torch.Tensor | None
    group: int

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def k(self) -> int:
        return self.packed.shape[1] * 4

    def nbytes(self) -> int:
        """Bytes a launch reads of the weight (kept codes, position words, scales, zero points)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.packed, self.meta_words, self.scale, self.zero_bias) if t is not None)


def sparse24_mma_fits(k: int, group: int | None, zero: torch.Tensor | None, x_dtype: torch.dtype) -> bool:
    """Whether sparse24_mma takes a 2:4 + int4 layer (K inputs, scale group ``group``, zero points
    ``zero`` or None) at x_dtype: 16-bit x, a group of int4_mma's GROUPS dividing K, integer zero
    points in ZERO_RANGE (the fill nibble 8 + zero: module docstring). Reads ``zero`` (a host sync):
    ask once per layer."""
    if x_dtype not in mma.MMA_DTYPES or group not in mma.GROUPS or k % group:
        return False
    if zero is None:
        return True
    z = zero.float()
    return bool(((z == z.round()) & (z >= ZERO_RANGE[0]) & (z <= ZERO_RANGE[1])).all())


def selector_codes(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (positions [..., 2]: p0 < p1), its selector codes: b0 = p0 + (p1 >= 2) names what its
    positions 0, 1 hold ((v0, v1), (v0, fill), (fill, v0), (fill, fill)), b1 = p1 - 1 + (p0 == 2) what
    positions 2, 3 hold ((fill, fill), (v1, fill), (fill, v1), (v0, v1)): SPARSE24_TABLE_LO / _HI."""
    p0, p1 = positions[..., 0].long(), positions[..., 1].long()
    return p0 + (p1 >= 2).long(), p1 - 1 + (p0 == 2).long()


def repack_sparse24(packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None = None) -> Sparse24MMAWeight:
    """kernels/quant.py's 2:4 + int4 layout (packed uint8 [N, K / 4] kept codes, meta uint8 [N, K / 8]
    positions, scale and optional zero [N, K / group]) -> Sparse24MMAWeight: the codes as they are,
    the positions re-coded into one int32 word per 32 inputs (lane c's codes b0, b1 of its groups 2 c,
    2 c + 1 at bits _sparse24_shift(c) + 4 k: the same 4 bits a group), zero points as int4_mma's bias.
    Raises on a layout, group or zero point it does not take (sparse24_mma_fits)."""
    if packed.dtype != torch.uint8 or meta.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"sparse24_mma: packed / meta must be uint8, got {packed.dtype} / {meta.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 4
    if meta.shape != (n, k // 8):
        raise ValueError(f"sparse24_mma: meta {tuple(meta.shape)} is not [{n}, {k // 8}] for codes {tuple(packed.shape)}")
    if scale.dim() != 2 or scale.shape[0] != n or not scale.shape[1] or k % scale.shape[1]:
        raise ValueError(f"sparse24_mma: scale {tuple(scale.shape)} is not [N, K / group] of codes [{n}, {k}]")
    group = k // scale.shape[1]
    mma.check_group(k, group)
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"sparse24_mma: zero {tuple(zero.shape)} does not match scale {tuple(scale.shape)}")
    if not sparse24_mma_fits(k, group, zero, torch.bfloat16):
        raise ValueError(f"sparse24_mma: zero points must be integers in {list(ZERO_RANGE)}")
    pos = unpack_meta_24(meta).reshape(n, k // BLOCK, 4, 2, 2)  # [n, block, lane c, group of the lane, p0 / p1]
    if not bool((pos[..., 0] < pos[..., 1]).all()):
        raise ValueError("sparse24_mma: positions must ascend within each group (kernels/quant.py's compress_24)")
    b0, b1 = selector_codes(pos)  # [n, block, c, group of the lane]
    fields = torch.stack((b0[..., 0], b0[..., 1], b1[..., 0], b1[..., 1]), dim=-1)  # [n, block, c, k]
    c = torch.arange(4, device=meta.device)
    bit = (16 * (c >> 1) + 2 * (c & 1))[:, None] + 4 * torch.arange(4, device=meta.device)[None, :]
    words = (fields << bit).sum(dim=(-1, -2))  # disjoint bits: the sum is the OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    zero_bias = None if zero is None else ((8 - zero.float()).to(torch.int32) * 0x00010001).contiguous()
    return Sparse24MMAWeight(packed.contiguous(), words.contiguous(), scale.float().contiguous(), zero_bias, group)


def sparse24_mma(x: torch.Tensor, weight: Sparse24MMAWeight, bias: torch.Tensor | None = None, *,
                 config: tuple[int, int, int, int, int] | None = None,
                 workspace: SplitKWorkspace = mma.WORKSPACE) -> torch.Tensor:
    """x [M <= 16, K] (bf16 or fp16) @ W^T (+ bias) with W a Sparse24MMAWeight, rounded once to x's
    dtype; reference: kernels/quant.py's fp32_weight_linear_ref on sparse24_int4_dequantize's weight
    (exact codes and products, fp32 sums). ``config``: int4_mma's (BLOCK_N, BLOCK_K, SPLIT_K,
    num_warps, num_stages), else int4_mma_config."""
    codes = weight.packed
    if codes.storage_offset() % 2:  # read as int16: a lane's two groups
        codes = codes.clone()
    return mma.launch("sparse24_mma", x, weight.n, weight.k, weight.group, codes.view(torch.int16), weight.meta_words,
                      weight.scale, weight.zero_bias, bias, config, workspace, sparse24=True)
