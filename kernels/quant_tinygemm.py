"""torch's tinygemm int4 kernel (`aten._weight_int4pack_mm`, the one gpt-fast and torchao's int4
weight-only use) over kernels/quant.py's int4 layout: the layout conversions and the call.

tinygemm dequantizes w = (q_u - 8) * scale + zero, q_u in 0..15 (the codes stored +8, as ours),
scale and zero per group of `group` inputs in scales_and_zeros [K / group, N, 2]; ours is
w = (q_s - z) * s with q_s = q_u - 8, so scale = s and zero = -z * s (0 without zero points).
Its packed weight is built on the GPU by `aten._convert_weight_to_int4pack` from uint8 [N, K / 2]
codes with the even column in the high nibble (ours keep it in the low one). On CUDA it takes
bf16 activations only (contiguous, 2-D), N a multiple of 8, K a multiple of inner_k_tiles * 16,
groups of 32, 64, 128 or 256, an SM 8.0+ GPU. The CPU ops (`..._for_cpu`) compute the same
dequantization from int32 [N, K] codes: the tests check our conversion through them.
"""

from __future__ import annotations

import torch

from kernels import quant as ref

TINYGEMM_GROUPS = (32, 64, 128, 256)


def inner_k_tiles(k: int) -> int | None:
    """The k-tiles of 16 packed side by side (8, 4 or 2: the widest load K allows), or None."""
    return next((tiles for tiles in (8, 4, 2) if k % (tiles * 16) == 0), None)


def tinygemm_fits(n: int, k: int, group: int) -> bool:
    """Whether tinygemm takes an [n, k] int4 weight with groups of `group` inputs."""
    return n % 8 == 0 and group in TINYGEMM_GROUPS and k % group == 0 and inner_k_tiles(k) is not None


def tinygemm_available(device: torch.device) -> bool:
    """CUDA with tinygemm's tensor-core kernel (SM 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Our [N, G] scale and optional zero point -> tinygemm's [G, N, 2] (scale, -zero * scale)."""
    scale = scale.float()
    shift = torch.zeros_like(scale) if zero is None else -zero.float() * scale
    return torch.stack((scale, shift), dim=-1).transpose(0, 1).contiguous().to(dtype)


def high_nibble_first(packed: torch.Tensor) -> torch.Tensor:
    """Our packed codes (uint8 [N, K / 2], even column in the low nibble) -> the same codes with
    the even column in the high nibble, the input of aten._convert_weight_to_int4pack."""
    return ((packed & 0xF) << 4) | (packed >> 4)


def pack_for_gpu(packed: torch.Tensor) -> torch.Tensor:
    """Our packed codes on a CUDA device -> tinygemm's int32 tensor-core layout."""
    k = packed.shape[1] * 2
    tiles = inner_k_tiles(k)
    if tiles is None:
        raise ValueError(f"tinygemm: in_features {k} is not a multiple of 32")
    return torch.ops.aten._convert_weight_to_int4pack(high_nibble_first(packed).contiguous(), tiles)


def gpu_layout_ref(packed: torch.Tensor, tiles: int) -> torch.Tensor:
    """Torch version of what aten._convert_weight_to_int4pack makes on CUDA from our packed codes:
    int32 [N / 8, K / (tiles * 16), 32, tiles / 2]. Row n = 8 n_tile + r and the bytes of a row's
    k super-tile (tiles * 8 of them; byte b = 16 p + 4 i + c) go to lane t = 4 r + c, word p, the
    byte's even column (high nibble in its input) at bits 4 i, the odd one at bits 16 + 4 i."""
    n, half = packed.shape
    v = high_nibble_first(packed).to(torch.int32).reshape(n // 8, 8, half // (tiles * 8), tiles // 2, 4, 4)
    shifts = 4 * torch.arange(4, dtype=torch.int32, device=packed.device).view(4, 1)
    words = (((v >> 4) << shifts) | ((v & 0xF) << (shifts + 16))).sum(dim=4, dtype=torch.int32)  # over i
    return words.permute(0, 2, 1, 4, 3).reshape(n // 8, half // (tiles * 8), 32, tiles // 2).contiguous()


def unpack_gpu_layout(weight: torch.Tensor) -> torch.Tensor:
    """tinygemm's CUDA layout (gpu_layout_ref) -> our packed codes uint8 [N, K / 2]."""
    n_tiles, k_tiles, _, words = weight.shape
    w = weight.reshape(n_tiles, k_tiles, 8, 4, words, 1)  # [n tile, k super-tile, r, c, p, 1]
    shifts = 4 * torch.arange(4, dtype=torch.int32, device=weight.device)
    even, odd = (w >> shifts) & 0xF, (w >> (shifts + 16)) & 0xF  # [..., i]
    ours = (even | (odd << 4)).to(torch.uint8)  # [n tile, k super-tile, r, c, p, i]
    return ours.permute(0, 2, 1, 4, 5, 3).reshape(n_tiles * 8, k_tiles * words * 16).contiguous()


def pack_for_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Our packed codes -> the CPU tinygemm layout (aten._convert_weight_to_int4pack_for_cpu)."""
    unsigned = (ref.unpack_int4(packed).to(torch.int32) + 8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)


def tinygemm_mm(x: torch.Tensor, weight: torch.Tensor, group: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W in tinygemm's layout for x's device (CUDA: bf16 x only)."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), weight, group, scales_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group, scales_zeros)
