"""Tensor-core int4 weight-only GEMM for decode (1 <= M <= 16): y = x @ W^T (+ bias), W int4 per group.

Why: the CUDA-core GEMV (kernels/gemv.py, _matmul_fast_runs) spends ~8.4 SASS instructions per
weight byte in its K loop, more than the ~7.9 an H200 SM can issue per byte at the copy ceiling
(132 SMs x 4 schedulers x 32 lanes x 1.98 GHz / 4.27 TB/s): it is ALU bound at 30-44% of the
ceiling. Here the multiply-adds go to the tensor cores (one HGMMA does 64 x 16 x 16), so what is
left per weight byte is the dequantization (bit operations, no conversion) and one fp32 FMA per
group and output: ~5-6 instructions per byte (the table below).

Layout (repack_int4, once at load time, from kernels/quant.py's [N, K / 2] bytes): int32 words
[N, K / 8], a row's words contiguous (a program's tile: BLOCK_N runs of BLOCK_K / 2 bytes, whole
cache lines), codes stored + 8. Within each 32-input block (4 words) the codes are in the MMA
operand's fragment order (Marlin's idea): word c holds inputs 2c, 2c + 1, 2c + 8, 2c + 9 of the
block's two k16 tiles, exactly the codes lane l = 4 r + c holds in its 16-bit operand registers
(WORD_OF, NIBBLE_OF). So each thread loads its own words and Triton keeps the dequantization in
the operand's register layout: no shared-memory round trip of the 4x larger bf16 operand, which
in the plain row layout (8 consecutive codes a word) cost 8 shared-memory bytes per weight byte
and capped the kernel at ~60-80% of the ceiling (the table below: "before"). The two
codes of a register sit at nibbles s, s + 4, so one LOP3, ((w >> 4 s) & 0x000F000F) | 0x43004300,
makes both bf16s 128 + u (fp16: 0x6400, 1024 + u), no int -> float conversion, and one HADD2
subtracts 136 from both: the exact code - 8. Scales stay fp32 [N, K / GROUP]; zero points
(integers, ZERO_RANGE) become zero_bias int32 = (8 - zero) in both halves, added instead of
OR-ed (u + 8 - zero stays in 0..127: exact in the 7-bit mantissa): the operand is the exact
code - zero - 8 as well.

Kernel (swap AB: the weight is the MMA's M side, BLOCK_N rows of it, and the 1..16 rows of x,
masked to 16 with zeros, its N side): per group, part = dot(W_op [BLOCK_N, GROUP], x^T [GROUP, 16])
in fp32, W_op exact, then acc += scale * part (one FMA per output and group). No dequantized
weight is rounded: the reference is kernels/quant.py's int4_linear_fast_ref (fp32 dequant, one
rounding at the end), met to fp32 summation order. BLOCK_K spans BLOCK_K / GROUP groups a step;
SPLIT_K programs share a column tile's K. (An offset-and-correct operand, OFFSET + u with
- (OFFSET + 8 + zero) * sum_group(x) on the partial sum, cost 1.6 more instructions per byte for
the per-group x sums, and non-integer zero points are not what int4 quantization makes.)

Split-K reduction, deterministic, one launch: each program stores its fp32 partial [M, BLOCK_N] to
a workspace, a CTA barrier, then one thread takes a ticket from its tile's counter (atomic add,
acq_rel at GPU scope: CUTLASS's semaphore pattern); the program drawing the last ticket sums the
SPLIT_K partials in split order 0..SPLIT_K-1 (L2 reads, .cg): the same order, so bitwise the same
result, on every run; adds the bias, rounds once to x's dtype, stores, and resets the counter to 0
for the next launch (CUDA-graph replays included). Atomics into a zeroed fp32 buffer were the
other choice: they need a memset and a rounding launch beside the kernel (two launches of ~2 us
against a 2.5 us o_proj at the ceiling), and their order (so the bits) varies. The workspace and
counters belong to one stream at a time (kernels/gemv.py SplitKWorkspace).

Count before timing. DRAM bytes per weight byte: codes 1 + fp32 scale 8 / GROUP (+ int32 zero
bias 8 / GROUP): 1.0625 (g128), 1.125 (g64), 1.125 (g128 zero); x (2 K M bytes a column tile) and
the split-K partials are L2 hits. experiments/int4_mma_sass_count.py, compiled for sm_90 with
Triton 3.9's ptxas, K loop per thread over the code bytes it covers, N = K = 4096 (the loop is the
same at every M: M only masks x). Budgets at the copy ceiling (16.3 weight bytes an SM a clock):
~7.9 issued instructions, ~7.9 shared-memory bytes (128 B a clock an SM) per weight byte.

    config (BLOCK_N, BLOCK_K, SPLIT_K,    instr / weight byte     smem B / weight byte   regs
            num_warps, num_stages)        g128   g64   g128 zero   g128   g64   zero
    128, 256, 8, 4, 3 (heuristic's tile)  5.25   6.35  5.93        4.16   4.72  4.47  153-168
    128, 256, 8, 4, 1                     4.88   5.60  5.48        3.81   4.12  4.12  157-168
    128, 512, 4, 4, 1                     4.93   5.50  5.33        3.81   4.12  4.12  111-170
    64, 512, 4, 4, 1                      5.34   5.84  5.75        4.00   4.00  4.50  104-128
    64, 256, 8, 4, 1                      5.52   5.89  6.20        4.00   4.00  4.50   80-98
    64, 256, 8, 4, 3                      6.56   7.91  7.48        4.69   5.19  5.06   75-95
    CUDA-core _matmul_fast_runs (gemv)    8.4 at its best config (8, 2048, 2)
    before the fragment order, best       4.67   5.32  5.86        9.81  10.12 10.12 (128, 512, 4, 4, 1)

The tensor cores are not the bound either: 64 padded-row FLOPs a weight byte is 0.27 PFLOP/s at
the ceiling, about a quarter of the H200's dense bf16. What the counts cannot say is whether
4-8 warps an SM keep enough loads in flight (Little's law: ~32 KB an SM): num_stages 2-3 stage
the codes through cp.async (more in flight, 1-2 B/B more shared memory); 1 loads them straight
to registers. experiments/int4_mma_sweep.py times both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import HAS_TRITON, interpreting, tl, triton
from kernels.gemv import SPLIT_K_WORKSPACE, SplitKWorkspace
from kernels.quant import unpack_int4

MAX_M = 16  # rows per launch: x is padded to the 16-wide MMA operand
GROUPS = (32, 64, 128, 256)  # a group spans whole words and one dot's K (>= 16)
WORD = 8  # codes per int32 word
BLOCK = 32  # codes per block of 4 words: the k extent of one thread's fragment words (2 k16 MMA tiles)
# Code 32 T + i of a row (i = 16 tt + 8 q + 2 c + p) sits in word 4 T + WORD_OF[i] (= c) at nibble
# NIBBLE_OF[i] (= 4 p + 2 tt + q): word c holds exactly the codes at K 2 c, 2 c + 1, 2 c + 8, 2 c + 9
# of two k16 tiles, the ones a thread's 16-bit MMA operand registers hold (the wgmma / mma A
# fragment: lane l has k pairs 2 (l % 4) and 2 (l % 4) + 8), with each register's pair p = 0, 1 at
# nibbles s, s + 4 (one 0x000F000F mask for both).
WORD_OF = tuple((i >> 1) & 3 for i in range(BLOCK))
NIBBLE_OF = tuple(4 * (i & 1) + 2 * (i >> 4) + ((i >> 3) & 1) for i in range(BLOCK))
MMA_DTYPES = (torch.bfloat16, torch.float16)
ZERO_RANGE = (-104, 8)  # integer zero points the operand takes: code + 8 - zero in 0..127 (int4's: -8..7)


@dataclass(frozen=True)
class Int4MMAWeight:
    """An int4 weight repacked for int4_mma: words int32 [N, K / 8] (WORD_OF / NIBBLE_OF order), scale fp32
    [N, K / group], and for zero points (w = (code - zero) * scale) zero_bias int32 [N, K / group]
    = (8 - zero) in both 16-bit halves (what the kernel adds to a nibble pair), else None."""

    words: torch.Tensor
    scale: torch.Tensor
    zero_bias: torch.Tensor | None
    group: int

    @property
    def n(self) -> int:
        return self.words.shape[0]

    @property
    def k(self) -> int:
        return self.words.shape[1] * WORD

    def nbytes(self) -> int:
        """Bytes a launch reads of the weight (codes, scales, zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero_bias) if t is not None)


def check_group(k: int, group: int) -> None:
    if group not in GROUPS:
        raise ValueError(f"int4_mma: group size {group} not supported (groups of {GROUPS} inputs)")
    if k % group:
        raise ValueError(f"int4_mma: in_features {k} is not a multiple of the group size {group}")


def repack_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> Int4MMAWeight:
    """kernels/quant.py's int4 layout (packed uint8 [N, K / 2], even column in the low nibble;
    scale and optional zero [N, K / group]) -> Int4MMAWeight. Raises on a group or zero point it
    does not take (zero points: integers in ZERO_RANGE, as int4 quantization makes them)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"int4_mma: packed codes must be uint8 [N, K / 2], got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"int4_mma: scale {tuple(scale.shape)} is not [N, K / group] of codes [{n}, {k}]")
    group = k // scale.shape[1]
    check_group(k, group)
    zero_bias = None
    if zero is not None:
        if zero.shape != scale.shape:
            raise ValueError(f"int4_mma: zero {tuple(zero.shape)} does not match scale {tuple(scale.shape)}")
        z = zero.float()
        if not bool(((z == z.round()) & (z >= ZERO_RANGE[0]) & (z <= ZERO_RANGE[1])).all()):
            raise ValueError(f"int4_mma: zero points must be integers in {list(ZERO_RANGE)}")
        zero_bias = ((8 - z).to(torch.int32) * 0x00010001).contiguous()
    u = (unpack_int4(packed).to(torch.int64) + 8).reshape(n, k // BLOCK, BLOCK)
    words = torch.zeros(n, k // BLOCK, BLOCK // WORD, dtype=torch.int64, device=packed.device)
    for i in range(BLOCK):  # disjoint nibbles: the sum is the OR
        words[:, :, WORD_OF[i]] += u[:, :, i] << (4 * NIBBLE_OF[i])
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).reshape(n, k // WORD)
    return Int4MMAWeight(words.contiguous(), scale.float().contiguous(), zero_bias, group)


def unrepack_int4(weight: Int4MMAWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Int4MMAWeight -> kernels/quant.py's (packed uint8 [N, K / 2], scale, zero or None)."""
    words = weight.words.reshape(weight.n, -1, BLOCK // WORD)
    u = torch.stack([(words[:, :, WORD_OF[i]] >> (4 * NIBBLE_OF[i])) & 0xF for i in range(BLOCK)], dim=-1)
    u = u.reshape(weight.n, -1)  # code 32 T + i at [T, i]
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)
    zero = None if weight.zero_bias is None else (8 - (weight.zero_bias & 0xFFFF)).float()
    return packed, weight.scale, zero


SMS_X2 = 264  # two programs per SM of an H200 (132 SMs)
PARTIALS_SHARE = 4  # split-K partials (written and read, fp32) at most 1 / PARTIALS_SHARE of the weight bytes


def int4_mma_config(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): 256 inputs (whole groups) a step, three
    cp.async stages, 4 warps (one warpgroup); 128 columns a program (two m64 wgmma tiles: the fewest
    instructions per weight byte, module docstring), else 64 where that launches more programs
    (narrower tiles than a warpgroup's m64 fall back to mma.sync, replicated over the warps).
    SPLIT_K: the least power of two giving two programs per SM of an H200, each split one step or
    more, and the partials' traffic (8 M SPLIT_K bytes a column, written and read) at most a
    quarter of the weight's (K / 2 a column): at M == 1 every 7B shape gets its 264 programs; at
    M == 16 K / 1024 splits at most. From the sm_90 counts; experiments/int4_mma_sweep.py times
    the alternatives."""
    block_k = max(256, group)
    best = None
    for block_n in (128, 64):  # a warpgroup's wgmma tiles: narrower ones fall back to replicated mma.sync
        tiles = triton.cdiv(n, block_n)
        split = 1
        while (tiles * split < SMS_X2 and k // (2 * split) >= block_k
               and 16 * m * 2 * split * PARTIALS_SHARE <= k):
            split *= 2
        if best is None or tiles * split > best[0]:
            best = (tiles * split, (block_n, block_k, split, 4, 3))
        if tiles * split >= SMS_X2:
            break
    return best[1]


WORKSPACE = SPLIT_K_WORKSPACE  # shared with gemv's split_k


if HAS_TRITON:
    from kernels.gemv import _rnd
    from kernels.quant_gemv import _prmt

    @triton.jit
    def _round_to(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """fp32 v rounded to dtype, ties to even. The interpreter's fp32 -> bf16 cast truncates:
        there, round on the bits (kernels/gemv.py's _rnd)."""
        if BF16_BY_HAND and dtype == tl.bfloat16:
            return _rnd(v, dtype, True).to(dtype)
        else:
            return v.to(dtype)

    @triton.jit
    def _half(pairs, HIGH: tl.constexpr, dtype: tl.constexpr, BY_HAND: tl.constexpr):
        """The low (or HIGH) 16 bits of int32 ``pairs`` as a dtype value (a truncation, or a shift
        and a truncation: the halves of one register). The interpreter has no bf16 (numpy): there
        the bf16 is made as the fp32 of the same upper bits."""
        if BY_HAND and dtype == tl.bfloat16:
            return ((pairs >> 16) << 16 if HIGH else pairs << 16).to(tl.float32, bitcast=True)
        elif HIGH:
            return (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
        else:
            return pairs.to(tl.int16).to(dtype, bitcast=True)

    @triton.jit
    def _pair(words, SHIFT: tl.constexpr, bias, HAS_ZERO: tl.constexpr, dtype: tl.constexpr):
        """Nibbles SHIFT / 4 and SHIFT / 4 + 4 of each word as two 16-bit floats' bits: OR-ed into
        the magic (bf16 0x4300 = 128.0, fp16 0x6400 = 1024.0, in both halves: a literal; a magic
        passed as an argument keeps Triton from loading the words straight in the MMA operand's
        layout), or added to the row's zero bias (magic + 8 - zero, no carry out of a half)."""
        nib = (words >> SHIFT) & 0x000F000F if SHIFT else words & 0x000F000F
        if HAS_ZERO:
            return nib + bias
        elif dtype == tl.bfloat16:
            return nib | 0x43004300
        else:
            return nib | 0x64006400

    @triton.jit
    def _operand(words, bias, dtype: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZERO: tl.constexpr, BY_HAND: tl.constexpr):
        """Words int32 [BLOCK_N, GROUP / 32, 4] (repack_int4's fragment order) and the rows' zero
        bias [BLOCK_N, 1, 1] -> the MMA operand [BLOCK_N, GROUP] holding OFFSET + v exactly in K
        order (0x4300 + v: bf16 128 + v; 0x6400 + v: fp16 1024 + v; v the code, or code + 8 - zero
        in 0..127), no conversion instruction. Word (T, c) holds K 32 T + 16 tt + 8 q + 2 c + p at
        nibble 4 p + 2 tt + q: pair s = 2 tt + q is (p = 0, p = 1)."""
        return _pairs_operand(_pair(words, 0, bias, HAS_ZERO, dtype), _pair(words, 4, bias, HAS_ZERO, dtype),
                              _pair(words, 8, bias, HAS_ZERO, dtype), _pair(words, 12, bias, HAS_ZERO, dtype),
                              dtype, BLOCK_N, GROUP, BY_HAND)

    @triton.jit
    def _pairs_operand(p0, p1, p2, p3, dtype: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                       BY_HAND: tl.constexpr):
        """Four int32 [BLOCK_N, GROUP / 32, 4] of 16-bit pairs (pair s = 2 tt + q of lane word (T, c):
        the operand's columns 32 T + 16 tt + 8 q + 2 c + p, p = 0 the low half) -> the MMA operand
        [BLOCK_N, GROUP]. The joins, the permute and the reshape only rename registers: each thread
        holds its fragment's words, so Triton loads them straight in the operand's layout (no
        shared-memory round trip of the 4x larger 16-bit operand). kernels/sparse24_mma.py makes its
        pairs otherwise and assembles them here."""
        lo = tl.join(tl.join(_half(p0, False, dtype, BY_HAND), _half(p1, False, dtype, BY_HAND)),
                     tl.join(_half(p2, False, dtype, BY_HAND), _half(p3, False, dtype, BY_HAND)))
        hi = tl.join(tl.join(_half(p0, True, dtype, BY_HAND), _half(p1, True, dtype, BY_HAND)),
                     tl.join(_half(p2, True, dtype, BY_HAND), _half(p3, True, dtype, BY_HAND)))
        t = tl.join(lo, hi)  # [n, T, c, q, tt, p]
        return tl.reshape(tl.permute(t, (0, 1, 4, 3, 2, 5)), (BLOCK_N, GROUP))  # [n, (T, tt, q, c, p)]

    @triton.jit
    def _finish(acc, pid_n, pid_k, cols, rows, col_mask, row_mask, b_ptr, out_ptr, part_ptr, count_ptr,
                out_stride, dtype: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                HAS_BIAS: tl.constexpr, BY_HAND: tl.constexpr):
        """A program's fp32 acc [BLOCK_N, 16] (columns x rows) out: stored alone (SPLIT_K == 1), or as
        its split's partial, the program drawing the tile's last ticket summing the SPLIT_K partials
        in split order (the module docstring's deterministic split-K); bias, one rounding to dtype."""
        out_mask = col_mask[:, None] & row_mask[None, :]
        if SPLIT_K > 1:
            tile = part_ptr + (pid_n * SPLIT_K * 16 * BLOCK_N + rows[None, :] * BLOCK_N
                               + tl.arange(0, BLOCK_N)[:, None])  # [SPLIT_K, 16, BLOCK_N] a tile
            tl.store(tile + pid_k * 16 * BLOCK_N, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the ticket (release below)
            ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_N, 16], tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(tile + s * 16 * BLOCK_N, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + pid_n, 0)
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptr + rows[None, :] * out_stride + cols[:, None], _round_to(acc, dtype, BY_HAND),
                         mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + rows[None, :] * out_stride + cols[:, None], _round_to(acc, dtype, BY_HAND),
                     mask=out_mask)

    # 2:4 + int4 (kernels/sparse24_mma.py, whose docstring argues the design): the 8-byte table a PRMT
    # looks a lane's selectors up in, nibble pairs (source byte of the first, of the second position;
    # 0 / 1: the group's v0 / v1, 4: the fill). Entries 0, 4, 5, 6: positions 0, 1 by p0 | [p1 >= 2] << 2
    # ((v0, v1), (v0, -), (-, v0), (-, -)); entries 7, 1, 3, 2: positions 2, 3 by (p0 >> 1 | p1 << 1) ^ 5
    # ((-, -), (v1, -), (-, v1), (v0, v1)): the two index sets disjoint.
    SPARSE24_TABLE_LO = tl.constexpr(0x14104110)  # entries 0..3
    SPARSE24_TABLE_HI = tl.constexpr(0x44440440)  # entries 4..7

    @triton.jit
    def _sparse24_pairs(codes, meta, fill, bias, HAS_ZERO: tl.constexpr, dtype: tl.constexpr):
        """A lane's four operand pairs (_pairs_operand's pair s: position s of the lane's groups 2 c and
        2 c + 1, OFFSET + v in 16 bits) from its 16 bits of kept codes (v0 | v1 << 4 a group) and its
        byte of kernels/quant.py's positions (p0 | p1 << 2 a group), ``fill`` (bytes of nibble 8 + zero:
        the operand's 0 after the bias)."""
        kb = _prmt(codes, codes >> 4, tl.full(codes.shape, 0x5140, tl.int32))  # v0, v1, v0', v1' (low nibbles)
        t = meta >> 1
        first = (meta & 0x33) | (t & 0x44)  # p0 | [p1 >= 2] << 2 of both groups
        index = first | (((t & 0x77) ^ 0x55) << 8)  # and (p0 >> 1 | p1 << 1) ^ 5 of both
        table_lo = tl.full(index.shape, SPARSE24_TABLE_LO, tl.int32)
        # + 0x22: the second group's codes are source bytes 2, 3 (its fill 6: still the fill)
        sel = _prmt(table_lo, tl.full(index.shape, SPARSE24_TABLE_HI, tl.int32), index) + 0x22002200
        r01 = _prmt(kb, fill, sel)  # positions 0 (bytes 0, 2: the two groups) and 1 (bytes 1, 3)
        r23 = _prmt(kb, fill, sel >> 16)
        return (_pair(r01, 0, bias, HAS_ZERO, dtype), _pair(r01, 8, bias, HAS_ZERO, dtype),
                _pair(r23, 0, bias, HAS_ZERO, dtype), _pair(r23, 8, bias, HAS_ZERO, dtype))

    @triton.jit
    def _int4_mma_kernel(
        x_ptr, w_ptr, m_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, x_stride, out_stride,
        N: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, K_SPLIT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BY_HAND: tl.constexpr, SPARSE24: tl.constexpr = False,
    ):
        """Programs (column tile, K split); K_SPLIT inputs a split (a multiple of BLOCK_K). SPARSE24
        (kernels/sparse24_mma.py): w_ptr the kept codes as int16 and m_ptr the positions as bytes
        (both a lane's two groups), z_ptr fp32 zero points; the operand is expanded from them
        (_sparse24_pairs) and x permuted to its column order (operand column 32 T + 16 tt + 8 q +
        2 c + p reads dense input 32 T + 8 c + 4 p + 2 tt + q)."""
        dtype = x_ptr.dtype.element_ty
        # The operand holds OFFSET + code (- SUB: code - 8), or OFFSET + code + 8 - zero (- SUB:
        # code - 8 - zero); OFFSET 128 (bf16), 1024 (fp16).
        if dtype == tl.bfloat16:
            SUB: tl.constexpr = 144.0 if HAS_ZERO else 136.0
            MAGIC: tl.constexpr = 0x43004300
        else:
            SUB: tl.constexpr = 1040.0 if HAS_ZERO else 1032.0
            MAGIC: tl.constexpr = 0x64006400
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        rows = tl.arange(0, 16)
        row_mask = rows < M
        jw = (tl.arange(0, GROUP // 32)[:, None] * 4 + tl.arange(0, 4)[None, :])[None, :, :]  # word (T, c)
        jk = tl.arange(0, GROUP)
        m_rows = m_ptr + cols.to(tl.int64)[:, None, None] * (K // 8)
        w_rows = w_ptr + cols.to(tl.int64)[:, None, None] * (K // 8)
        s_rows = s_ptr + cols * (K // GROUP)
        z_rows = z_ptr + cols * (K // GROUP)
        x_rows = x_ptr + rows[None, :] * x_stride
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        k_begin = pid_k * K_SPLIT
        for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
            for gi in tl.static_range(BLOCK_K // GROUP):
                kg = k0 + gi * GROUP
                w_mask = col_mask & (cols * 0 + kg < K)  # a split past K (ragged K) loads nothing
                # SPARSE24: the kept codes as int16, a lane's two groups (the same index: K / 8 of them a row)
                words = tl.load(w_rows + kg // 8 + jw, mask=w_mask[:, None, None], other=0)
                scale = tl.load(s_rows + kg // GROUP, mask=w_mask, other=0.0)
                bias = tl.full([BLOCK_N, 1, 1], 0, tl.int32)  # unused without zero points
                if HAS_ZERO and SPARSE24:  # fp32 integer zero points (kernels/quant.py's) -> the same bias
                    zero = tl.load(z_rows + kg // GROUP, mask=w_mask, other=0.0).to(tl.int32)[:, None, None]
                    bias = MAGIC + (8 - zero) * 0x00010001
                elif HAS_ZERO:  # (8 - zero) in both halves (repack_int4): v = code + 8 - zero in 0..127
                    bias = MAGIC + tl.load(z_rows + kg // GROUP, mask=w_mask, other=0)[:, None, None]
                xt = tl.load(x_rows + (kg + jk)[:, None], mask=row_mask[None, :] & (kg + jk < K)[:, None],
                             other=0.0)  # [GROUP, 16]
                if SPARSE24:  # in the operand's column order: dense (T, c, p, tt, q) -> (T, tt, q, c, p)
                    xt = tl.reshape(tl.permute(tl.reshape(xt, (GROUP // 32, 4, 2, 2, 2, 16)), (0, 3, 4, 1, 2, 5)),
                                    (GROUP, 16))
                    meta = tl.load(m_rows + kg // 8 + jw, mask=w_mask[:, None, None], other=0).to(tl.int32)
                    fill = tl.full([BLOCK_N, 1, 1], 0x08080808, tl.int32)  # nibble 8: code 0
                    if HAS_ZERO:  # nibble 8 + zero = 16 - (8 - zero): the operand's 0 after the bias
                        fill = (16 - (bias & 0xFF)) * 0x01010101
                    p0, p1, p2, p3 = _sparse24_pairs(words.to(tl.int32), meta, fill, bias, HAS_ZERO, dtype)
                    w_op = _pairs_operand(p0, p1, p2, p3, dtype, BLOCK_N, GROUP, BY_HAND)
                else:
                    w_op = _operand(words, bias, dtype, BLOCK_N, GROUP, HAS_ZERO, BY_HAND)
                # the exact code - 8 - zero: one 16-bit subtraction per code (two per register)
                if BY_HAND:  # the interpreter's dot multiplies 16-bit floats' raw bits: fp32 (exact products)
                    part = tl.dot(w_op.to(tl.float32) - SUB, xt.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(w_op - tl.full([1, 1], SUB, dtype), xt)
                acc += scale[:, None] * part
        _finish(acc, pid_n, pid_k, cols, rows, col_mask, row_mask, b_ptr, out_ptr, part_ptr, count_ptr, out_stride,
                dtype, BLOCK_N, SPLIT_K, HAS_BIAS, BY_HAND)


def check_config(config: tuple[int, int, int, int, int], group: int) -> None:
    block_n, block_k, split, num_warps, num_stages = config
    if block_n < 16 or block_n & (block_n - 1) or block_k % group or block_k & (block_k - 1) or split < 1:
        raise ValueError(f"int4_mma: config {config}: BLOCK_N a power of two >= 16, BLOCK_K a power of two "
                         f"multiple of the group size {group}, SPLIT_K >= 1")


def int4_mma(x: torch.Tensor, weight: Int4MMAWeight, bias: torch.Tensor | None = None, *,
             config: tuple[int, int, int, int, int] | None = None,
             workspace: SplitKWorkspace = WORKSPACE) -> torch.Tensor:
    """x [M <= 16, K] (bf16 or fp16) @ W^T (+ bias) with W an Int4MMAWeight, rounded once to x's
    dtype; reference: kernels/quant.py's int4_linear_fast_ref on the unrepacked weight.
    ``config``: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), else int4_mma_config."""
    return launch("int4_mma", x, weight.n, weight.k, weight.group, weight.words, weight.words, weight.scale,
                  weight.zero_bias, bias, config, workspace, sparse24=False)


def launch(what: str, x: torch.Tensor, n: int, k: int, group: int, words: torch.Tensor, meta: torch.Tensor,
           scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
           config: tuple[int, int, int, int, int] | None, workspace: SplitKWorkspace, sparse24: bool) -> torch.Tensor:
    """Check x and bias against an [n, k] weight (errors named by ``what``), pick the config, launch
    _int4_mma_kernel: dense words and ``zero`` the zero bias (repack_int4), or with ``sparse24``
    kernels/sparse24_mma.py's kept codes as int16, positions ``meta`` as bytes and fp32 ``zero``."""
    m = x.shape[0]
    if x.dtype not in MMA_DTYPES:
        raise ValueError(f"{what}: x dtype {x.dtype} not supported (bf16, fp16: the MMA operand holds 16-bit floats)")
    if x.dim() != 2:
        raise ValueError(f"{what}: x {tuple(x.shape)} is not [rows, K]")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{what}: {m} rows; the kernel takes 1 to {MAX_M}")
    if x.shape[1] != k:
        raise ValueError(f"{what}: x has {x.shape[1]} inputs, the weight {k}")
    check_group(k, group)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{what}: bias {tuple(bias.shape)} is not [{n}]")
    config = config or int4_mma_config(m, n, k, group)
    check_config(config, group)
    block_n, block_k, split, num_warps, num_stages = config
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)  # no split left without inputs
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    part, count = workspace.get(x.device, tiles * split * 16 * block_n if split > 1 else 1, tiles)
    _int4_mma_kernel[(tiles, split)](
        x, words, meta, scale, zero if zero is not None else scale, bias if bias is not None else x, out,
        part, count, m, x.stride(0), out.stride(0),
        N=n, K=k, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, K_SPLIT=k_split,
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, BY_HAND=interpreting(), SPARSE24=sparse24,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
