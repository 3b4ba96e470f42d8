"""2:4 sparse decode GEMV (the idea of Sparse-Marlin): y = x @ W^T + b for x [M <= 16, K] where W
[N, K] is stored as its kept half only, in kernels/quant.py's layouts: 2-bit positions four per
byte (meta uint8 [N, K / 8]) and the kept values either 16-bit floats (values [N, K / 2]) or int4
codes two per byte (packed uint8 [N, K / 4]) with per-group scales / zero points [N, K / G] of the
dense K. Only the kept bytes and the positions stream from memory (int4: K / 4 + K / 8 bytes per
row instead of int4's K / 2; 16-bit: K + K / 8 instead of 2 K).

Three paths, chosen by sparse24_gemv (its `path` names one for benchmarks):
- "fast" (M == 1, int4 codes, 16-bit x; fp32 weights as "select"): a thread reads runs of 4 code
  words (one 128-bit load; a word: 8 kept codes, 4 groups, 16 dense inputs) and their 16-bit
  position words, and the x of exactly those 16 inputs per word as int32 words of two (loaded
  once for all the thread's rows). Per word two PRMTs index a table of selector bytes by the 4
  groups' masked positions at once (_selectors); per group one PRMT gathers its selector, one
  more picks both kept inputs out of the group's 4 (8 bytes in two registers), and a shift / AND
  makes them fp32. A code becomes (code - 8 - zero) exactly by one LOP3 (the nibble left in place
  under the exponent of 2^23, as kernels/gemv.py's _int4_code) and one FFMA (times 2^-shift,
  minus 2^(23 - shift) + 8 + zero), then one FFMA with its input; the scale once per run. The
  meta bytes are read as they are (no repacked copy at load).
  Fused (sparse24_gemv_fused, sparse24_gemv_rope_store; kernels/decode_gemv.py's gemv / gemv_rope_store
  with quant "sparse24_int4" reach them, the engine's fused decode at batch 1): the same kernel
  with gemv's flags and helpers: the RMSNorm prologue (gemv's _row_stats, then each input
  normalised by gemv's _fast_x and packed back into 16-bit words for the PRMT picks), SwiGLU (gate
  and up rows: two row sets on one x), the residual add (gemv's _epilogue), and a sibling kernel
  with rotary + KV store (gemv's _rope_store_epilogue), all with PDL. SASS for sm_90 (K 11008, g128,
  no zero point / zero point, per dense input; per byte of kept codes + positions): unfused 3.79 /
  3.93 (10.1 / 10.5), norm prologue 4.66 / 4.81 (12.4 / 12.8: the per-input normalisation, about
  1.75 instructions an input, shared by the program's 8 rows), gate_up with norm and
  SwiGLU (4 columns, two row sets) 4.66 / 4.80, rotary + KV store 4.67 / 4.80, residual add 3.81 /
  3.93 (the epilogue is outside the K loop); K 4096, whole kernel (no zero point; the norm's
  row-stats pass included): 4.16 unfused, 5.53 norm, 5.66 norm + SwiGLU, 4.22 residual, 5.91
  rotary + KV store. The unfused chain's norm, SwiGLU and add launches come on top of its count
  (experiments/sparse24_sass_count.py).
- "select" (M == 1; the fast dequantization's semantics, fp32 weights as kernels/quant.py's
  fp32_weight_linear_ref): the program streams int32 words, a unit of 8 groups of 4 inputs at a
  time (one meta word; int4: two code words, 16-bit: eight value words, each a group's kept
  pair), loads the unit's 32 x values once for all its rows and picks each kept value's input
  with two selects among its group's 4 (the positions of a group ascend: the first kept is at
  0..2, the second at 1..3). int4 codes become floats in place by the magic-number trick with the
  zero point folded into the subtrahend, and the scale multiplies the unit's partial dot (a
  group of >= 32 inputs holds whole units), not each weight.
- "dot" (M > 1, or exact): per K tile, the dense weight's four position slices (position p of
  every group: the kept value there or zero) rebuilt in registers from the kept pairs, rounded
  to x's dtype as the references do (sparse24_int4_linear_ref, sparse24_linear_ref), each
  multiplied on the tensor cores with x's columns p, p + 4, ... (x padded to 16 rows). For int4
  codes at 2..16 16-bit rows kernels/sparse24_mma.py reads the same tensors with one MMA a group
  (the fp32 weight's product); engine/layers/sparse24.py times both.

SASS for sm_90 (experiments/sparse24_sass_count.py, bf16 x, int4 g128, the K loop per thread; K
11008): "select" 5.3 instructions per dense input (14.2 per byte of kept codes + positions, 10.6
per byte of the dense int4 codes the same weight has; two predicate LOP3s and FSELs per kept
code), "fast" at FAST_CONFIG 3.79 /
3.94 with zero points (10.1 / 10.5 per actual byte, 7.6 / 7.9 per dense-equivalent byte; K 4096,
whole kernel: 4.28, 8.6) against kernels/gemv.py's fast int4 at 4.55 per dense input
(gemv_sass_count: 9.1 per byte at K 11008, 9.6 at 4096 whole kernel): 0.83x the instructions
and 0.75x the bytes (scales aside) of int4 per weight. Per group of 4 inputs: 2 FFMA + 2 LOP3
(codes), 2 FFMA (products), 2 PRMT (selector, inputs), 2 shift / AND (to fp32), 0.75 selector
table and the word's code prep; left: rematerialized PRMT selector constants (an IMAD a use),
addressing. What the issue rate allows at the copy ceiling is about 2.9 per input for 0.375
bytes (bf16 values: 4.2 per input against 8.8). The count does not explain "select"'s 292 GB/s
(BENCHMARKS.md; 5.3 a input would issue at about 2 TB/s): its loop also waits on its loads (no
prefetch; 32- and 64-bit loads, x reloaded per unit), where "fast" loads a step ahead with
128-bit code loads; which of the two binds on the H200 is for the sweep to say. The dot loop spends 16-21 (compute bound at 16
rows). Sparse24Linear times the paths against a dense matmul per shape.

Tried for "fast" (one-step K loop, per dense input): PTX mad.hi for the selector (ptxas's IMAD.HI
takes a 64-bit addend, rebuilt by two MOVs a use: 5.07, against 4.88 for umulhi + add), each
group's selector by two masks and two IMAD.HIs (4.69), selectors gathered two groups a PRMT (3.80
/ 4.00, 4.27 with zero points at (8, 2048, 4): not kept); the two-step loop (no tile copies) took
(8, 2048, 4) from 4.00 to 3.79. Not yet tried: positions repacked at load (a group's p0, p1 four
bits apart: SHF + LOP3 + table PRMT a group, no gather PRMT; the dot path and the references
would read the new layout), FAST_CONFIG from a GPU sweep, M > 1.
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, interpreting, next_pow2, pdl_launch_args, tl, triton
from kernels.gemv import MAX_NORM_K

if HAS_TRITON:
    from kernels.gemv import (FAST_MIN_PROGRAMS, _PTX, _epilogue, _rnd, _rope_pairs, _rope_store_epilogue, _row_stats,
                              split8)
    from kernels.gemv import _fast_x as _norm_x

SMALL_M = 16
UNIT = 32  # dense inputs per meta word: 8 groups of 4
# (BLOCK_N, BLOCK_K, num_warps) per path, not yet swept on a GPU (experiments/sparse24_gemv_sweep.py
# times candidates): the int4 fast GEMV's shape of tile (kernels/gemv.py, FAST_M1_CONFIGS) and a
# tl.dot one.
SELECT_CONFIG = (8, 2048, 4)
DOT_CONFIG = (64, 128, 4)
# The "fast" path's (BLOCK_N, BLOCK_K, num_warps): kernels/gemv.py's int4 tile; fewer columns per
# program where N leaves fewer than FAST_MIN_PROGRAMS programs. BLOCK_K 4096 spills in the two-step
# loop (80-136 bytes at K 11008: sparse24_sass_count). An H200 sweep of 12 tiles at M == 1
# (benchmarks/2026-11-30-h200x2-s17/g0/sp24_m1.jsonl) timed four columns a program faster on the
# unfused kernel at K 4096 (the 7B's four shapes 49.8 us against 54.0), but with it the engine's fused
# batch-1 forward (norm prologue, SwiGLU and rotary at half the columns) took 2,243 us against ~2,000
# and the 7B decode fell from 476-491 to 433 tok/s (BENCHMARKS.md, seventeenth session): not kept.
FAST_CONFIG = (8, 2048, 4)
PATHS = ("select", "dot", "fast", "fast_rows")


def sparse24_fast_fits(k: int, kept: torch.Tensor, group: int | None, x_dtype: torch.dtype) -> bool:
    """Whether the "fast" path takes a row of x_dtype: int4 codes, 16-bit x, K whole code words (16
    inputs; sparse24_gemv_fits asks 32), a power-of-two group of whole words."""
    return (kept.dtype == torch.uint8 and x_dtype in (torch.bfloat16, torch.float16) and k % 16 == 0
            and group is not None and group >= 16 and group & (group - 1) == 0)


def _aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """t, or a copy where its first element is off an nbytes boundary (for a view as wider words)."""
    return t if (t.storage_offset() * t.element_size()) % nbytes == 0 else t.clone()


def sparse24_gemv_fits(k: int, kept: torch.Tensor, group: int | None = None) -> bool:
    """Whether sparse24_gemv takes a layer: K whole meta words (a multiple of 32), 16-bit kept
    values or int4 codes whose scale groups hold whole words (group a multiple of 32)."""
    if k % UNIT:
        return False
    if kept.dtype == torch.uint8:
        return group is not None and group % UNIT == 0
    return kept.dtype in (torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _half_pair(word, FP16: tl.constexpr):
        """A group's two kept 16-bit values (low half first) from one int32 word, as fp32."""
        if FP16:
            v0 = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            v1 = ((word >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            v0 = (word << 16).to(tl.float32, bitcast=True)
            v1 = (word & -65536).to(tl.float32, bitcast=True)  # 0xFFFF0000
        return v0, v1

    @triton.jit
    def _magic(word, SHIFT: tl.constexpr, sub):
        """The nibble at bit SHIFT (<= 12) of word, OR-ed into the mantissa of 2^23, minus `sub`
        (2^23 + (8 + zero) * 2^SHIFT): (code - zero) * 2^SHIFT, exact in fp32."""
        return ((word & (0xF << SHIFT)) | 0x4B000000).to(tl.float32, bitcast=True) - sub

    @triton.jit
    def _bit(word, BIT: tl.constexpr):
        """Whether bit BIT of an int32 word is set (one LOP3 to a predicate)."""
        if BIT == 31:
            return word < 0
        else:
            return (word & (1 << BIT)) != 0

    @triton.jit
    def _pick(meta, I: tl.constexpr, xa, xb, xc, xd, F0: tl.constexpr, F1: tl.constexpr):
        """The inputs of group I's two kept values (of a meta word: its first kept's position in
        bits 4I, 4I + 1, the second's in 4I + 2, 4I + 3), times F0 / F1, by two selects each:
        positions ascend within a group, so the first is at 0..2 and the second at 1..3."""
        x0 = tl.where(_bit(meta, 4 * I + 1), xc * F0, tl.where(_bit(meta, 4 * I), xb * F0, xa * F0))
        x1 = tl.where(_bit(meta, 4 * I + 3), tl.where(_bit(meta, 4 * I + 2), xd * F1, xc * F1), xb * F1)
        return x0, x1

    @triton.jit
    def _sparse24_select_kernel(
        x_ptr, kept_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        N, K, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
        INT4: tl.constexpr, FP16: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BF16_BY_HAND: tl.constexpr, X_WORDS: tl.constexpr,
    ):
        UNITS = K // 32
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        c = cols.to(tl.int64)[:, None]
        meta_rows = meta_ptr + c * UNITS  # int32 words
        if INT4:  # int32 words
            kept_rows = kept_ptr + c * (UNITS * 2)
        else:
            kept_rows = kept_ptr + c * (UNITS * 8)
        acc = tl.zeros([BLOCK_N, BLOCK_U], tl.float32)
        for u0 in range(0, UNITS, BLOCK_U):
            u = u0 + tl.arange(0, BLOCK_U)
            u_mask = u < UNITS
            mask = col_mask[:, None] & u_mask[None, :]
            meta = tl.load(meta_rows + u[None, :], mask=mask, other=0)
            part = tl.zeros([BLOCK_N, BLOCK_U], tl.float32)
            if INT4:
                lo = tl.load(kept_rows + 2 * u[None, :], mask=mask, other=0)
                hi = tl.load(kept_rows + 2 * u[None, :] + 1, mask=mask, other=0)
                g = (u * 32) // GROUP
                scale = tl.load(s_ptr + c * (K // GROUP) + g[None, :], mask=mask, other=0.0).to(tl.float32)
                off = tl.full([BLOCK_N, BLOCK_U], 8.0, tl.float32)
                if HAS_ZERO:
                    off += tl.load(z_ptr + c * (K // GROUP) + g[None, :], mask=mask, other=0.0).to(tl.float32)
                # groups 0, 1 of a code word sit at bits 0..15, groups 2, 3 at 16..31: read from >> 16
                lo_hi = lo >> 16
                hi_hi = hi >> 16
                sub0 = 8388608.0 + off
                sub4 = 8388608.0 + off * 16.0
                sub8 = 8388608.0 + off * 256.0
                sub12 = 8388608.0 + off * 4096.0
            for i in tl.static_range(8):
                if X_WORDS:  # bf16 x as int64 words: a group's 4 inputs in one load
                    xw = tl.load(x_ptr + u * 8 + i, mask=u_mask, other=0)
                    xa, xb = _half_pair(xw.to(tl.int32), False)
                    xc, xd = _half_pair((xw >> 32).to(tl.int32), False)
                    xa, xb, xc, xd = xa[None, :], xb[None, :], xc[None, :], xd[None, :]
                else:
                    xk = x_ptr + u * 32 + 4 * i
                    xa = tl.load(xk, mask=u_mask, other=0.0).to(tl.float32)[None, :]
                    xb = tl.load(xk + 1, mask=u_mask, other=0.0).to(tl.float32)[None, :]
                    xc = tl.load(xk + 2, mask=u_mask, other=0.0).to(tl.float32)[None, :]
                    xd = tl.load(xk + 3, mask=u_mask, other=0.0).to(tl.float32)[None, :]
                if INT4:
                    if i < 2:
                        word = lo
                    elif i < 4:
                        word = lo_hi
                    elif i < 6:
                        word = hi
                    else:
                        word = hi_hi
                    if i % 2 == 0:  # the pair at bits 0, 4: x scaled by 2^-0, 2^-4
                        x0, x1 = _pick(meta, i, xa, xb, xc, xd, 1.0, 0.0625)
                        part += _magic(word, 0, sub0) * x0  # two FFMAs, not FMUL + FFMA + FADD
                        part += _magic(word, 4, sub4) * x1
                    else:  # bits 8, 12
                        x0, x1 = _pick(meta, i, xa, xb, xc, xd, 0.00390625, 0.000244140625)
                        part += _magic(word, 8, sub8) * x0
                        part += _magic(word, 12, sub12) * x1
                else:
                    x0, x1 = _pick(meta, i, xa, xb, xc, xd, 1.0, 1.0)
                    v0, v1 = _half_pair(tl.load(kept_rows + 8 * u[None, :] + i, mask=mask, other=0), FP16)
                    part += v0 * x0
                    part += v1 * x1
            if INT4:
                acc += part * scale
            else:
                acc += part
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if BF16_BY_HAND:
            y = _rnd(y, tl.bfloat16, True)
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _sparse24_dot_kernel(
        x_ptr, kept_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, x_stride, out_stride,
        N, K, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INT4: tl.constexpr, FP16: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BF16_BY_HAND: tl.constexpr, IEEE: tl.constexpr,
    ):
        GROUPS = K // 4
        BLOCK_G: tl.constexpr = BLOCK_K // 4
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        c = cols.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // 4 + tl.arange(0, BLOCK_G)
            mask = col_mask[:, None] & (g < GROUPS)[None, :]
            byte = tl.load(meta_ptr + c * (K // 8) + (g // 2)[None, :], mask=mask, other=0).to(tl.int32)
            nib = (byte >> ((g % 2) * 4)[None, :]) & 0xF
            first = nib & 3
            second = nib >> 2
            if INT4:
                code = tl.load(kept_ptr + c * GROUPS + g[None, :], mask=mask, other=0).to(tl.int32)
                sg = c * (K // GROUP) + (g * 4 // GROUP)[None, :]
                scale = tl.load(s_ptr + sg, mask=mask, other=0.0).to(tl.float32)
                v0 = (code & 0xF).to(tl.float32) - 8.0
                v1 = (code >> 4).to(tl.float32) - 8.0
                if HAS_ZERO:
                    zero = tl.load(z_ptr + sg, mask=mask, other=0.0).to(tl.float32)
                    v0 -= zero
                    v1 -= zero
                v0 *= scale
                v1 *= scale
            else:
                v0, v1 = _half_pair(tl.load(kept_ptr + c * GROUPS + g[None, :], mask=mask, other=0), FP16)
            if BF16_BY_HAND:
                v0 = _rnd(v0, tl.bfloat16, True)
                v1 = _rnd(v1, tl.bfloat16, True)
            v0 = v0.to(x_ptr.dtype.element_ty)
            v1 = v1.to(x_ptr.dtype.element_ty)
            zeros = tl.zeros([BLOCK_N, BLOCK_G], x_ptr.dtype.element_ty)
            x_mask = row_mask[:, None] & (g < GROUPS)[None, :]
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride + 4 * g[None, :]
            # position p of every group: one [BLOCK_N, BLOCK_G] slice of the dense weight, whose
            # inputs are x's columns p, p + 4, ... (the first kept sits at 0..2, the second at 1..3)
            for p in tl.static_range(4):
                if p == 0:
                    w = tl.where(first == 0, v0, zeros)
                elif p == 3:
                    w = tl.where(second == 3, v1, zeros)
                else:
                    w = tl.where(first == p, v0, tl.where(second == p, v1, zeros))
                x = tl.load(x_rows + p, mask=x_mask, other=0.0)
                if IEEE:  # fp32 (no tf32 rounding); the interpreter's 16-bit dot is not exact
                    acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if BF16_BY_HAND:
            acc = _rnd(acc, tl.bfloat16, True)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _prmt(lo, hi, sel):
        """PTX prmt.b32 (default mode): byte k of the result is byte (sel >> 4k) & 7 of the 8 bytes
        hi:lo (sel's nibbles below 8: no sign replication). The interpreter runs the shifts."""
        if _PTX:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sel],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            pair = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
            out = tl.zeros(lo.shape, tl.int64)
            for k in tl.static_range(4):
                out |= ((pair >> (((sel >> (4 * k)) & 7) * 8).to(tl.int64)) & 0xFF) << (8 * k)
            return out.to(tl.int32)

    @triton.jit
    def _selectors(meta):
        """Per code word (meta: its 16 position bits, group J's first kept position in bits 4J,
        4J + 1, the second's in 4J + 2, 4J + 3), two words of PRMT selector bytes: byte J of the
        first is 2 p0 | (2 p0 + 1) << 4 of group J, of the second the same of p1. Each is one PRMT
        of the table of bytes 0x10, 0x32, 0x54, 0x76 (p -> the nibble pair of input p's two bytes)
        indexed by the 4 groups' masked positions at once (nibble J: p0, or p1 after a shift)."""
        table = tl.full(meta.shape, 0x76543210, tl.int32)
        first = _prmt(table, table, meta & 0x3333)
        second = _prmt(table, table, (meta >> 2) & 0x3333)
        return first, second

    @triton.jit
    def _kept_x(first, second, J: tl.constexpr, xlo, xhi, FP16: tl.constexpr):
        """The inputs of group J's two kept codes (fp32) from its 4 inputs, the 16-bit halves of
        xlo, xhi: group J's selector (bytes J of _selectors' two words, one PRMT) picks both
        (one PRMT), then each moves to the top of a word (bf16) or converts (fp16)."""
        sel = _prmt(first, second, tl.full(first.shape, J | ((4 + J) << 4), tl.int32))
        return _half_pair(_prmt(xlo, xhi, sel), FP16)

    @triton.jit
    def _kept_code(src, SHIFT: tl.constexpr, sub):
        """The int4 code at bit SHIFT (<= 16) of src (a code word with the exponent of 2^23 in its
        top byte, as kernels/gemv.py's _int4_code reads it) minus 8 and the zero point: the float
        2^23 + u 2^SHIFT times 2^-SHIFT minus `sub` (2^(23 - SHIFT) + 8 + zero), one LOP3 and one
        exact FFMA (the selected x is per row and weight: no 2^-SHIFT folded into it)."""
        bits = src & (0x4B000000 | (0xF << SHIFT))
        return bits.to(tl.float32, bitcast=True) * (1.0 / (1 << SHIFT)) - sub

    @triton.jit
    def _fast_tile(w_rows, m_rows, s_rows, z_rows, k0, col_mask, K: tl.constexpr, GROUP: tl.constexpr,
                   HAS_ZERO: tl.constexpr, R: tl.constexpr, T: tl.constexpr):
        """The step at k0: code words [BLOCK_N, R, T] (word t * R + r at [:, r, t]: a thread's run of
        R words, one 128-bit load), their 16 position bits (int16 -> int32), group scales and
        zero points ([BLOCK_N, 1, T] where a run is within one group, else [BLOCK_N, R, T])."""
        WPG: tl.constexpr = GROUP // 16
        t = k0 // (16 * R) + tl.arange(0, T)
        j = t[None, :] * R + tl.arange(0, R)[:, None]
        if WPG % R == 0:
            g = (t * R // WPG)[None, :]
        else:
            g = j // WPG
        w_mask = col_mask[:, None, None] & (j < K // 16)[None, :, :]
        g_mask = col_mask[:, None, None] & (g < K // GROUP)[None, :, :]
        words = tl.load(w_rows[:, :, None] + j[None, :, :], mask=w_mask, other=0)
        meta = tl.load(m_rows[:, :, None] + j[None, :, :], mask=w_mask, other=0).to(tl.int32)
        scale = tl.load(s_rows[:, :, None] + g[None, :, :], mask=g_mask, other=0.0).to(tl.float32)
        zero = scale
        if HAS_ZERO:
            zero = tl.load(z_rows[:, :, None] + g[None, :, :], mask=g_mask, other=0.0).to(tl.float32)
        return words, meta, scale, zero

    @triton.jit
    def _fast_tiles(w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2, k0, col_mask,
                    K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                    TWO: tl.constexpr):
        """_fast_tile's step at k0 for the first row set and, with TWO, the second (SwiGLU's up rows,
        rotary's second-half rows; else the first's again, unused)."""
        tile = _fast_tile(w_rows, m_rows, s_rows, z_rows, k0, col_mask, K, GROUP, HAS_ZERO, R, T)
        tile2 = tile
        if TWO:
            tile2 = _fast_tile(w_rows2, m_rows2, s_rows2, z_rows2, k0, col_mask, K, GROUP, HAS_ZERO, R, T)
        return tile, tile2

    @triton.jit
    def _pack_pair(v0, v1, FP16: tl.constexpr):
        """Two fp32 values that hold 16-bit ones exactly as one int32 word of the two, v0 in the low
        half (_half_pair's inverse)."""
        if FP16:
            lo = v0.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            hi = v1.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:
            lo = (v0.to(tl.int32, bitcast=True) >> 16) & 0xFFFF
            hi = v1.to(tl.int32, bitcast=True) & -65536  # 0xFFFF0000
        return lo | hi

    @triton.jit
    def _fast_x(x_ptr, xw_ptr, nw_ptr, rstd, k0, K: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                NORM: tl.constexpr, FP16: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """The step's inputs as int32 words of two 16-bit values, indexed as _fast_tile's code
        words: the 8 words of word (r, t)'s 16 inputs, 128-bit loads (xw_ptr: x as int32 words)
        split in registers. NORM: RMS-normalised first, by kernels/gemv.py's _fast_x (x_ptr: the
        16-bit row, rstd its scalar), each value rounded to the dtype as rmsnorm writes it, then
        packed back into words for the PRMT picks."""
        t = k0 // (16 * R) + tl.arange(0, T)
        j = (t[None, :] * R + tl.arange(0, R)[:, None])[:, :, None]
        if NORM:
            v = _norm_x(x_ptr, j * 16 + tl.arange(0, 16)[None, None, :], nw_ptr, rstd, 0.0, K, True, 2,
                        BF16_BY_HAND)
            lo, hi = tl.split(tl.reshape(v, (R, T, 8, 2)))
            x = _pack_pair(lo, hi, FP16)
        else:
            x = tl.load(xw_ptr + j * 8 + tl.arange(0, 8)[None, None, :], mask=j < K // 16, other=0)
        return split8(x, R, T)

    @triton.jit
    def _fast_step(acc, tile, xs, HAS_ZERO: tl.constexpr, FP16: tl.constexpr):
        """acc += one row set's step (tile) with its inputs xs (_fast_x): per code word its 4 groups'
        kept x picked by PRMT (_kept_x), its 8 codes made floats in place (_kept_code; codes 0..4
        from the word, 5..7 from a copy moved down 12 bits, as kernels/gemv.py's _int4_fast_mac),
        summed per run, times the scale."""
        words, meta, scale, zero = tile
        if _PTX:  # bytes 0..2 of the word, byte 3 the exponent's 0x4B
            lo = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x4B000000, 0x7210;", "=r,r", [words],
                                           dtype=tl.int32, is_pure=True, pack=1)
        else:
            lo = words | 0x4B000000
        hi = (words.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True) + 0x4B000000
        off = 8.0
        if HAS_ZERO:
            off = zero + 8.0
        part = tl.zeros(words.shape, tl.float32)
        first, second = _selectors(meta)
        for grp in tl.static_range(4):
            x0, x1 = _kept_x(first, second, grp, xs[2 * grp][None, :, :], xs[2 * grp + 1][None, :, :], FP16)
            if grp < 2:
                v0 = _kept_code(lo, 8 * grp, off + float(1 << (23 - 8 * grp)))
                v1 = _kept_code(lo, 8 * grp + 4, off + float(1 << (19 - 8 * grp)))
            elif grp == 2:
                v0 = _kept_code(lo, 16, off + 128.0)
                v1 = _kept_code(hi, 8, off + 32768.0)
            else:
                v0 = _kept_code(hi, 12, off + 2048.0)
                v1 = _kept_code(hi, 16, off + 128.0)
            part += v0 * x0
            part += v1 * x1
        if acc.shape[1] == 1:  # a run within one group: one scale for its words
            part = tl.sum(part, 1, keep_dims=True)
        return acc + part * scale

    @triton.jit
    def _fast_steps(acc, acc2, tiles, x_ptr, xw_ptr, nw_ptr, rstd, k0, K: tl.constexpr, R: tl.constexpr,
                    T: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr, HAS_ZERO: tl.constexpr,
                    FP16: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """acc (and acc2) += the step at k0: its inputs made once for both row sets (_fast_tiles)."""
        xs = _fast_x(x_ptr, xw_ptr, nw_ptr, rstd, k0, K, R, T, NORM, FP16, BF16_BY_HAND)
        acc = _fast_step(acc, tiles[0], xs, HAS_ZERO, FP16)
        if TWO:
            acc2 = _fast_step(acc2, tiles[1], xs, HAS_ZERO, FP16)
        return acc, acc2

    @triton.jit
    def _matmul_fast(x_ptr, xw_ptr, w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask,
                     nw_ptr, eps, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM: tl.constexpr, TWO: tl.constexpr, HAS_ZERO: tl.constexpr, FP16: tl.constexpr,
                     BF16_BY_HAND: tl.constexpr, PDL: tl.constexpr):
        """The fp32 sums [1, BLOCK_N] of x @ W^T for the rows at w_rows (pointers [BLOCK_N, 1]) and,
        with TWO, at w_rows2, over the same inputs (RMS-normalised with NORM: kernels/gemv.py's
        _row_stats, then _fast_x). K steps of BLOCK_K dense inputs, each step's tiles loaded one
        step ahead of their use (the last step's prefetch past K: masked loads); the first before
        the PDL wait, as kernels/gemv.py's matmuls."""
        R: tl.constexpr = 4 if BLOCK_K >= 64 else BLOCK_K // 16
        T: tl.constexpr = BLOCK_K // (16 * R)
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        a = _fast_tiles(w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2, 0, col_mask, K, GROUP,
                        HAS_ZERO, R, T, TWO)
        if PDL:  # x is the previous kernel's output: wait for it, then let the next kernel start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.arange(0, 1)
        rstd, _ = _row_stats(x_ptr + row[:, None], row < 1, tl.arange(0, BLOCK_K), nw_ptr, eps, K, 1, BLOCK_K,
                             NORM, 2, BF16_BY_HAND)
        rstd = tl.sum(rstd, 0)
        acc = tl.zeros([BLOCK_N, 1 if (GROUP // 16) % R == 0 else R, T], tl.float32)  # as the scales
        acc2 = acc
        # two steps an iteration, the tiles alternating between two sets of registers (a one-step
        # loop copies the prefetched tile into the current one's: a MOV a word)
        for k0 in range(0, (STEPS // 2) * 2 * BLOCK_K, 2 * BLOCK_K):
            b = _fast_tiles(w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2, k0 + BLOCK_K,
                            col_mask, K, GROUP, HAS_ZERO, R, T, TWO)
            acc, acc2 = _fast_steps(acc, acc2, a, x_ptr, xw_ptr, nw_ptr, rstd, k0, K, R, T, NORM, TWO, HAS_ZERO,
                                    FP16, BF16_BY_HAND)
            a = _fast_tiles(w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2, k0 + 2 * BLOCK_K,
                            col_mask, K, GROUP, HAS_ZERO, R, T, TWO)
            acc, acc2 = _fast_steps(acc, acc2, b, x_ptr, xw_ptr, nw_ptr, rstd, k0 + BLOCK_K, K, R, T, NORM, TWO,
                                    HAS_ZERO, FP16, BF16_BY_HAND)
        if STEPS % 2 == 1:
            acc, acc2 = _fast_steps(acc, acc2, a, x_ptr, xw_ptr, nw_ptr, rstd, (STEPS - 1) * BLOCK_K, K, R, T, NORM,
                                    TWO, HAS_ZERO, FP16, BF16_BY_HAND)
        return tl.sum(tl.sum(acc, 2), 1)[None, :], tl.sum(tl.sum(acc2, 2), 1)[None, :]

    @triton.jit
    def _rows(w_ptr, m_ptr, s_ptr, z_ptr, cols, K: tl.constexpr, GROUP: tl.constexpr):
        """Row pointers [BLOCK_N, 1] of the code words, position words, scales and zero points."""
        c = cols.to(tl.int64)[:, None]
        return w_ptr + c * (K // 16), m_ptr + c * (K // 16), s_ptr + c * (K // GROUP), z_ptr + c * (K // GROUP)

    @triton.jit
    def _sparse24_int4_fast_kernel(
        x_ptr, xw_ptr, w_ptr, m_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, res_ptr, out_ptr, N, eps,
        K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        FP16: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_BY_HAND: tl.constexpr,
        NORM: tl.constexpr = False, SWIGLU: tl.constexpr = False, RESIDUAL: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        """M == 1, 16-bit x (x_ptr; xw_ptr: the same row as int32 words): y = x @ W^T with W's kept
        int4 codes as int32 words (8 codes, 4 groups of 4 inputs, 16 dense inputs), their 2-bit
        positions as int16 (16 bits a word, kernels/quant.py's meta bytes as they are), and
        kernels/gemv.py's fusions around it (its _epilogue): NORM (RMSNorm prologue, nw_ptr),
        bias, SWIGLU (W has 2N rows, gate then up: out = silu(gate) * up), RESIDUAL (out =
        res + y; out may be res)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w_rows, m_rows, s_rows, z_rows = _rows(w_ptr, m_ptr, s_ptr, z_ptr, cols, K, GROUP)
        w_up, m_up, s_up, z_up = _rows(w_ptr, m_ptr, s_ptr, z_ptr, cols + N, K, GROUP)
        acc, acc_up = _matmul_fast(x_ptr, xw_ptr, w_rows, w_up, m_rows, m_up, s_rows, s_up, z_rows, z_up, col_mask,
                                   nw_ptr, eps, K, GROUP, BLOCK_N, BLOCK_K, NORM, SWIGLU, HAS_ZERO, FP16,
                                   BF16_BY_HAND, PDL)
        row = tl.arange(0, 1)
        _epilogue(acc, acc_up, row, cols, col_mask, (row < 1)[:, None] & col_mask[None, :], b_ptr, res_ptr, out_ptr,
                  0, 0, N, x_ptr.dtype.element_ty, HAS_BIAS, SWIGLU, RESIDUAL, BF16_BY_HAND)

    @triton.jit
    def _sparse24_rope_store_kernel(
        x_ptr, xw_ptr, w_ptr, m_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, q_ptr, pos_ptr, cos_ptr, sin_ptr,
        k_cache_ptr, v_cache_ptr, slot_ptr, eps, cos_stride, sin_stride,
        K: tl.constexpr, GROUP: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP16: tl.constexpr, HAS_ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BF16_BY_HAND: tl.constexpr, PDL: tl.constexpr,
    ):
        """kernels/gemv.py's gemv_rope_store on a 2:4 + int4 qkv weight at M == 1: programs over
        BLOCK_N rotary pairs (columns col and col + HALF: _rope_pairs), the two row sets' sums by
        _matmul_fast, then gemv's _rope_store_epilogue (bias, rotation, q out, k / v into the cache)."""
        j_mask, head, d, col = _rope_pairs(BLOCK_N, Q_HEADS, KV_HEADS, HALF)
        w_rows, m_rows, s_rows, z_rows = _rows(w_ptr, m_ptr, s_ptr, z_ptr, col, K, GROUP)
        w_rows2, m_rows2, s_rows2, z_rows2 = _rows(w_ptr, m_ptr, s_ptr, z_ptr, col + HALF, K, GROUP)
        acc1, acc2 = _matmul_fast(x_ptr, xw_ptr, w_rows, w_rows2, m_rows, m_rows2, s_rows, s_rows2, z_rows, z_rows2,
                                  j_mask, nw_ptr, eps, K, GROUP, BLOCK_N, BLOCK_K, NORM, True, HAS_ZERO, FP16,
                                  BF16_BY_HAND, PDL)
        row = tl.arange(0, 1)
        _rope_store_epilogue(acc1, acc2, row, row < 1, j_mask, head, d, col, b_ptr, q_ptr, 0, pos_ptr, cos_ptr,
                             sin_ptr, cos_stride, sin_stride, slot_ptr, k_cache_ptr, v_cache_ptr,
                             x_ptr.dtype.element_ty, Q_HEADS, KV_HEADS, HALF, HAS_BIAS, BF16_BY_HAND)


def sparse24_gemv(x: torch.Tensor, kept: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, exact: bool = False,
                  config: tuple[int, int, int] | None = None, path: str | None = None) -> torch.Tensor:
    """x [M <= 16, K] (fp32, bf16 or fp16) times a 2:4 weight: kept = values [N, K / 2] (bf16 /
    fp16) or int4 codes packed [N, K / 4] (uint8, with scale [N, K / G] and optional zero).
    M == 1 without `exact`: the fast path where it fits (int4 codes, 16-bit x), else the select
    path (both fp32 weights: kernels/quant.py's fp32_weight_linear_ref of the dense weight); else
    the dot path (the weight rounded to x's dtype: sparse24_linear_ref / sparse24_int4_linear_ref).
    "fast_rows" (never the default): each of M rows through the fast path, one launch a row (its
    fp32-weight semantics; Sparse24Linear times it against "dot" at M > 1, whose tensor-core tile
    recomputes the dense weight per 16 rows and measured 5-17x the fast path's batch-1 time on the
    H200's 7B shapes at M 2-16).
    config: (BLOCK_N, BLOCK_K, warps); path: one of PATHS instead of the default (benchmarks)."""
    m, k = x.shape
    n = kept.shape[0]
    int4 = kept.dtype == torch.uint8
    group = k // scale.shape[1] if int4 else None
    if m > SMALL_M:
        raise ValueError(f"sparse24_gemv: {m} rows (at most {SMALL_M})")
    if meta.shape != (n, k // 8) or kept.shape != ((n, k // 4) if int4 else (n, k // 2)):
        raise ValueError(f"sparse24_gemv: kept {tuple(kept.shape)} / meta {tuple(meta.shape)} do not fit K {k}")
    if not sparse24_gemv_fits(k, kept, group):
        raise ValueError(f"sparse24_gemv: K {k} (multiple of {UNIT}), kept {kept.dtype}, group {group} not taken")
    if int4 and (scale.shape != (n, k // group) or (zero is not None and zero.shape != scale.shape)):
        raise ValueError(f"sparse24_gemv: scale {tuple(scale.shape)} / zero do not fit [{n}, K / group]")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"sparse24_gemv: x dtype {x.dtype}")
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    rows_fit = not exact and sparse24_fast_fits(k, kept, group, x.dtype)
    fast_fits = m == 1 and rows_fit
    if path is None:
        path = "fast" if fast_fits else "select" if m == 1 and not exact else "dot"
    if path not in PATHS or (path == "fast" and not fast_fits) or (path == "fast_rows" and not rows_fit) or \
            (path == "select" and m != 1):
        raise ValueError(f"sparse24_gemv: path {path!r} does not take {m} rows of {x.dtype} on kept {kept.dtype}")
    if path in ("fast", "fast_rows"):
        for row in range(m):  # one launch a row, without PDL (a plain launch, as the other paths')
            sparse24_gemv_fused(x[row:row + 1], kept, meta, scale, zero, bias, out=out[row:row + 1], config=config,
                                pdl=False)
        return out
    scale_arg = scale if int4 else meta
    common = dict(N=n, K=k, GROUP=group or UNIT, INT4=int4, FP16=kept.dtype == torch.float16,
                  HAS_ZERO=int4 and zero is not None, HAS_BIAS=bias is not None,
                  BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16)  # its casts truncate
    words = kept if int4 else kept.view(torch.int32)  # 16-bit: one int32 word per group's kept pair
    select = path == "select"
    x_words = select and x.dtype == torch.bfloat16
    if select:  # int32 words of the positions and the int4 codes
        meta, words = meta.view(torch.int32), words.view(torch.int32)
    if x_words and x.storage_offset() % 4:
        x = x.clone()  # int64 words need 8-byte alignment
    args = (x.view(torch.int64) if x_words else x, words, meta, scale_arg, zero if int4 and zero is not None else scale_arg,
            bias if bias is not None else scale_arg, out)
    block_n, block_k, warps = config or (SELECT_CONFIG if select else DOT_CONFIG)
    block_k = min(block_k, next_pow2(k))
    warps = warps if not interpreting() else 1
    grid = (triton.cdiv(n, block_n),)
    if select:
        _sparse24_select_kernel[grid](*args, BLOCK_N=block_n, BLOCK_U=max(1, block_k // UNIT), **common,
                                      X_WORDS=x_words, num_warps=warps)
    else:
        _sparse24_dot_kernel[grid](*args, m, x.stride(0), out.stride(0), BLOCK_M=max(16, next_pow2(m)),
                                   BLOCK_N=max(16, block_n), BLOCK_K=max(64, block_k), **common,
                                   IEEE=x.dtype == torch.float32 or interpreting(), num_warps=warps)
    return out


def _fast_config(n: int, k: int, two: bool, config: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The fast path's (BLOCK_N, BLOCK_K, num_warps): ``config`` or FAST_CONFIG, half the columns
    where a program reads two row sets (``two``: SwiGLU, rotary pairs), K steps no wider than K,
    fewer columns per program where N would leave fewer than FAST_MIN_PROGRAMS programs."""
    block_n, block_k, warps = config or FAST_CONFIG
    if two and config is None:
        block_n = max(1, block_n // 2)
    block_k = max(16, min(block_k, next_pow2(k)))
    while block_n > 1 and triton.cdiv(n, block_n) < FAST_MIN_PROGRAMS:
        block_n //= 2
    return block_n, block_k, warps if not interpreting() else 1


def _fast_operands(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, norm_weight: torch.Tensor | None, what: str) -> tuple[torch.Tensor, dict]:
    """Checks a fused fast-path call (one 16-bit row, a weight the fast kernel takes: one ValueError
    naming what does not fit) and returns x (4-byte aligned) and the kernel's weight operands: x
    also as int32 words of two inputs, the codes as int32 words of 8, the meta bytes as int16 (a
    code word's 16 position bits)."""
    m, k = x.shape
    rows = packed.shape[0]
    group = k // scale.shape[1] if scale.dim() == 2 and scale.shape[1] and k % scale.shape[1] == 0 else None
    if m != 1 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: {m} rows of {x.dtype} (the 2:4 fused kernels take one bf16 / fp16 row)")
    if packed.shape != (rows, k // 4) or meta.shape != (rows, k // 8) or \
            not sparse24_fast_fits(k, packed, group, x.dtype):
        raise ValueError(f"{what}: 2:4 + int4 codes {tuple(packed.shape)} / meta {tuple(meta.shape)} / scale "
                         f"{tuple(scale.shape)} do not fit K {k} (K a multiple of 16, a power-of-two group >= 16)")
    if scale.shape[0] != rows or (zero is not None and zero.shape != scale.shape):
        raise ValueError(f"{what}: scale {tuple(scale.shape)} / zero do not fit [{rows}, K / group]")
    if norm_weight is not None and (norm_weight.shape != (k,) or k > MAX_NORM_K):
        raise ValueError(f"{what}: norm weight {tuple(norm_weight.shape)} for K {k} (at most {MAX_NORM_K})")
    x = _aligned(x.contiguous(), 4)
    return x, dict(x_ptr=x, xw_ptr=x.view(torch.int32), w_ptr=_aligned(packed, 4).view(torch.int32),
                   m_ptr=_aligned(meta, 2).view(torch.int16), s_ptr=scale,
                   z_ptr=zero if zero is not None else scale, nw_ptr=norm_weight if norm_weight is not None else scale,
                   K=k, GROUP=group, FP16=x.dtype == torch.float16, HAS_ZERO=zero is not None,
                   BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16)


def sparse24_gemv_fused(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                        norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                        residual: torch.Tensor | None = None,
                        swiglu: bool = False, out: torch.Tensor | None = None,
                        config: tuple[int, int, int] | None = None, pdl: bool = True) -> torch.Tensor:
    """kernels/gemv.py's gemv on a 2:4 + int4 weight (packed [R, K / 4], meta [R, K / 8], scale /
    zero [R, K / G]) at M == 1, 16-bit x: the fast path's product (the fp32 dequantized weight,
    rounded once) with gemv's fusions: RMSNorm prologue, bias, SwiGLU (R = 2 N: gate rows, then
    up rows), residual add (``out`` may be ``residual``). Reference: gemv_ref on
    kernels/quant.py's sparse24_int4_dequantize weight. ``config``: (BLOCK_N, BLOCK_K, warps)."""
    x, args = _fast_operands(x, packed, meta, scale, zero, norm_weight, "sparse24_gemv_fused")
    rows = packed.shape[0]
    if swiglu and rows % 2:
        raise ValueError(f"sparse24_gemv_fused: swiglu on {rows} rows (gate and up: an even count)")
    n = rows // 2 if swiglu else rows
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    if out.shape != (1, n) or out.stride(1) != 1 or (residual is not None and residual.shape != (1, n)):
        raise ValueError(f"sparse24_gemv_fused: out {tuple(out.shape)} / residual for [1, {n}]")
    if norm_weight is not None and out.data_ptr() == x.data_ptr():
        raise ValueError("sparse24_gemv_fused: out is x, whose whole row the norm prologue reads")
    block_n, block_k, warps = _fast_config(n, x.shape[1], swiglu, config)
    _sparse24_int4_fast_kernel[(triton.cdiv(n, block_n),)](
        **args, b_ptr=bias if bias is not None else scale, res_ptr=residual if residual is not None else out,
        out_ptr=out, N=n, eps=eps, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        **pdl_launch_args(pdl, x.device), num_warps=warps)
    return out


def sparse24_gemv_rope_store(
    x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
    out: torch.Tensor | None = None, config: tuple[int, int, int] | None = None, pdl: bool = True,
) -> torch.Tensor:
    """kernels/gemv.py's gemv_rope_store on a 2:4 + int4 qkv weight at M == 1, 16-bit x: norm
    prologue, the fast path's product, bias, q and k rotated, k and v into the paged cache at
    slot_mapping[0] (< 0: nothing); returns q [1, num_heads * head_dim]. Reference:
    gemv_rope_store_ref on sparse24_int4_dequantize's weight."""
    x, args = _fast_operands(x, packed, meta, scale, zero, norm_weight, "sparse24_gemv_rope_store")
    head_dim = k_cache.shape[-1]
    n = (num_heads + 2 * num_kv_heads) * head_dim
    if packed.shape[0] != n or head_dim % 2 or k_cache.shape[-2] != num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"sparse24_gemv_rope_store: {packed.shape[0]} weight rows, cache {tuple(k_cache.shape)} for "
                         f"{num_heads} + 2 x {num_kv_heads} heads")
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and positions.shape == (1,)
    assert cos_table.shape[-1] == head_dim and cos_table.stride(1) == 1 and sin_table.stride(1) == 1
    if out is None:
        out = torch.empty(1, num_heads * head_dim, dtype=x.dtype, device=x.device)
    assert out.shape == (1, num_heads * head_dim) and out.stride(1) == 1
    block_pairs, block_k, warps = _fast_config(n // 2, x.shape[1], True, config)
    _sparse24_rope_store_kernel[(triton.cdiv(n // 2, block_pairs),)](
        **args, b_ptr=bias if bias is not None else scale, q_ptr=out, pos_ptr=positions, cos_ptr=cos_table,
        sin_ptr=sin_table, k_cache_ptr=k_cache, v_cache_ptr=v_cache, slot_ptr=slot_mapping, eps=eps,
        cos_stride=cos_table.stride(0), sin_stride=sin_table.stride(0), Q_HEADS=num_heads, KV_HEADS=num_kv_heads,
        HALF=head_dim // 2, BLOCK_N=block_pairs, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, **pdl_launch_args(pdl, x.device), num_warps=warps)
    return out
