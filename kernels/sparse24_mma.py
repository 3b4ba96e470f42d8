"""Tensor-core 2:4 + int4 weight-only GEMM for decode (1 <= M <= 16): y = x @ W^T (+ bias).

Why: every 2..16-row path for the 2:4 + int4 layout was slow on the H200 at Llama-2-7B's shapes
(283-500 us a linear at M = 16 against a bf16 GEMM's 25-50 us; batch 16 decoded at 0.14x bf16):
kernels/quant_gemv.py's "dot" path runs four tl.dot's a K block (one per position of each group
of 4, on a masked weight: 4x the MMA work) and reads x with stride 4; "fast_rows" reads the weight
once per row; the torch rebuild writes a dense weight per call. Here the dense int4 tensor-core
GEMM (kernels/int4_mma.py: swap-AB, the operand built in registers in the MMA's fragment order,
per-group fp32 scale FMA, deterministic split-K; read its docstring) runs with SPARSE24: per
group ONE tl.dot on the dense operand expanded in registers from the kept codes and positions,
reading only the kept half of the codes plus the positions.

Layout. In the MMA operand (int4_mma's fragment order) lane l = 4 r + c of a row holds, per
32-input block, operand columns 2 c, 2 c + 1, 2 c + 8, 2 c + 9 of both k16 tiles: four 16-bit
pairs, pair s = 2 tt + q. The K order is ours to choose (x is read in the same order), so
operand column 32 T + 16 tt + 8 q + 2 c + p reads dense input 32 T + 8 c + 4 p + 2 tt + q: lane c
owns the whole groups 2 c and 2 c + 1 of each block, and its pair s holds position s of both
(p = 0 the first group). Owning whole groups fixes a lane's share of the kept codes at 4 and of
the positions at 8 bits: one int16 of kernels/quant.py's packed codes and one byte of its meta,
both read as they are (no repacked copy: the layer's own tensors, which its M == 1 GEMVs read
too); owning half of 4 groups (the identity order) would give a lane 0..8 of their codes. x is
read contiguously (cp.async, 16 B) and permuted in registers on its way to the shared memory the
MMA reads it from (a 2-byte gather in the permuted order cost 0.6 more a byte).

Expansion, per lane and 32-input block (8 dense inputs, 4 operand pairs): one SHF + one PRMT
spread the 4 codes to bytes (v0, v1, v0', v1' in low nibbles). The positions byte (p0 | p1 << 2 a
group) gives two 3-bit table indices a group in three LOP3s and one SHF on both groups at once,
p0 | [p1 >= 2] << 2 (what positions 0, 1 hold: (v0, v1), (v0, -), (-, v0), (-, -); "-" the fill)
and (p0 >> 1 | p1 << 1) ^ 5 (positions 2, 3: (-, -), (v1, -), (-, v1), (v0, v1)), disjoint sets
of one 8-byte table's entries (SPARSE24_TABLE_LO / _HI); one PRMT looks both groups' selectors up,
one IADD moves the second group's to its source bytes; one PRMT places positions 0 and 1 of both
groups (bytes 0, 2 and 1, 3), one SHF + one PRMT positions 2 and 3, each byte a kept code or the
fill (nibble 8 + zero: the bias makes it an exact 0); then int4_mma's _pair per pair (LOP3 of mask
and magic, after an SHF for bytes 1, 3) and one HADD2: the exact code - zero, or 0, in bf16 /
fp16. About 22 instructions against int4_mma's 11 (3 SHF, 4 LOP3, 4 HADD2) for the same 8
inputs, for 0.375 bytes an input against 0.5. Zero points (fp32, as the layer keeps them; made
int32 once a group): the fill nibble 8 + zero must be a nibble, so integers in ZERO_RANGE ([-8,
7], int4's own); others are refused (sparse24_mma_fits, sparse24_mma_weight). No dequantized
weight is rounded: the reference is kernels/quant.py's fp32_weight_linear_ref on
sparse24_int4_dequantize's weight, met to fp32 summation order (tests/kernels/test_sparse24_mma.py).

Bytes a launch reads of the weight (codes + positions + fp32 scales [+ fp32 zero points]), g128,
against kernels/int4_mma.py's dense int4 of the same shape (MiB; x and the split-K partials are
L2 hits); nothing else is stored for this path:

    shape                     dense int4   2:4 + int4        with zero points: int4 / 2:4
    qkv      12288 x  4096    25.50        19.50 (0.765x)    27.00 / 21.00 (0.778x)
    o_proj    4096 x  4096     8.50         6.50 (0.765x)     9.00 /  7.00 (0.778x)
    gate_up  22016 x  4096    45.69        34.94 (0.765x)    48.38 / 37.62 (0.778x)
    down      4096 x 11008    22.84        17.47 (0.765x)    24.19 / 18.81 (0.778x)
    a layer                  102.53        78.41 (0.765x)   108.56 / 84.44 (0.778x)

SASS for sm_90 (experiments/int4_mma_sass_count.py, formats sparse24_int4_*: Triton 3.9's ptxas,
the K loop per thread, N = K = 4096, M = 16; the loop is the same at every M). Weight bytes: kept
codes + positions (0.375 a dense input; scales left out, as int4_mma's count leaves them out).
Budget at the copy ceiling: ~7.9 issued instructions per weight byte (int4_mma's docstring).

    config (BLOCK_N, BLOCK_K,      instr / weight byte         instr / dense input       smem B/B  regs
            SPLIT_K, warps, stages) g128   g64  g128 zero  g32  g128  g64  zero  g32     g128      g128
    128, 256, 8, 4, 3 (heuristic)  12.44 13.40 13.33     16.06  4.66 5.02 5.00  6.02     5.54      166
    128, 256, 8, 4, 1              13.46 13.93 14.25     15.74  5.05 5.22 5.34  5.90     3.75      164
    64, 256, 8, 4, 1               14.00 14.52 15.00     19.12  5.25 5.45 5.62  7.17     2.67       96
    int4_mma dense, heuristic       5.25  6.35  5.93      8.46  2.62 3.18 2.97  4.23     4.16      153

No spills. Of g128's ~37 instructions a lane-block: ~22 expansion, ~5 constants re-materialised
per use (ptxas at ~166 registers: the 0x000F000F mask, the table), the MMA, scale FMA, loads and
addressing. At 12.4 per byte the kernel is issue bound at about 64% of the copy ceiling's bytes:
predicted time about 1.15x int4_mma's (memory bound on 1.31x the bytes), i.e. about bf16's at
M 8-16 where int4_mma measured 1.25x bf16, against 0.14x for the paths above.
experiments/sparse24_gemv_sweep.py times it (path "mma") against them, int4_mma and bf16 at
M = 1, 2, 4, 8, 16: the number that decides.

Tried (g128 at the heuristic tile, instructions a byte): the positions re-coded at load into one
int32 word a block (each lane's 4 selector codes at its own bits: SHF + LOP3 for the indices),
10.90 (zero points 11.69), but a second copy of the positions' bytes beside the meta the M == 1
GEMVs read (0.125 more bytes a dense input: the 2:4 + int4 layer as large as dense int4) and g32
at 21.4 (the quad-shared word cost the register-only operand there); x gathered in the operand's
order by 2-byte loads, 11.47 (with that word); the pairs placed by PRMT under the magic's high
byte (ptxas then rotates each pair before its HADD2), 14.0; the kept codes as int32 words (two
lanes a word, a per-lane selector), 15.2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import int4_mma as mma
from kernels.gemv import SplitKWorkspace
from kernels.quant import unpack_meta_24

ZERO_RANGE = (-8, 7)  # integer zero points the fill nibble 8 + zero takes (int4's)


@dataclass(frozen=True)
class Sparse24MMAWeight:
    """A 2:4 + int4 weight as sparse24_mma reads it: kernels/quant.py's tensors as they are (no copy):
    packed uint8 [N, K / 4] kept codes (read as int16: a lane's two groups), meta uint8 [N, K / 8]
    positions (read as bytes: the same two groups), scale fp32 [N, K / group], zero fp32 [N, K / group]
    (integers in ZERO_RANGE) or None. Made by sparse24_mma_weight, which checks them."""

    packed: torch.Tensor
    meta: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def k(self) -> int:
        return self.packed.shape[1] * 4

    def nbytes(self) -> int:
        """Bytes a launch reads of the weight (kept codes, positions, scales, zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.meta, self.scale, self.zero)
                   if t is not None)


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


def sparse24_mma_weight(packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor | None = None) -> Sparse24MMAWeight:
    """kernels/quant.py's 2:4 + int4 layout (packed uint8 [N, K / 4] kept codes, meta uint8 [N, K / 8]
    positions, scale and optional zero [N, K / group]) checked for sparse24_mma: one ValueError naming
    what it does not take (a layout, group or zero point: sparse24_mma_fits; positions that do not
    ascend within a group, as compress_24 makes them). Reads the tensors (host syncs): once per layer."""
    if packed.dtype != torch.uint8 or meta.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"sparse24_mma: packed / meta must be uint8, got {packed.dtype} / {meta.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 4
    if meta.shape != (n, k // 8):
        raise ValueError(f"sparse24_mma: meta {tuple(meta.shape)} is not [{n}, {k // 8}] for codes "
                         f"{tuple(packed.shape)}")
    if scale.dim() != 2 or scale.shape[0] != n or not scale.shape[1] or k % scale.shape[1]:
        raise ValueError(f"sparse24_mma: scale {tuple(scale.shape)} is not [N, K / group] of codes [{n}, {k}]")
    group = k // scale.shape[1]
    mma.check_group(k, group)
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"sparse24_mma: zero {tuple(zero.shape)} does not match scale {tuple(scale.shape)}")
    if not sparse24_mma_fits(k, group, zero, torch.bfloat16):
        raise ValueError(f"sparse24_mma: zero points must be integers in {list(ZERO_RANGE)}")
    pos = unpack_meta_24(meta).reshape(n, k // 4, 2)
    if not bool((pos[..., 0] < pos[..., 1]).all()):
        raise ValueError("sparse24_mma: positions must ascend within each group (kernels/quant.py's compress_24)")
    return Sparse24MMAWeight(packed.contiguous(), meta.contiguous(), scale.float().contiguous(),
                             None if zero is None else zero.float().contiguous(), group)


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
    return mma.launch("sparse24_mma", x, weight.n, weight.k, weight.group, codes.view(torch.int16), weight.meta,
                      weight.scale, weight.zero, bias, config, workspace, sparse24=True)
