"""Skinny GEMM for decode: y = x @ W^T with x [M, K], M <= SMALL_M rows, W [N, K] (nn.Linear layout).

At batch 1-16 a decode step's matmuls are memory bound: each reads its whole weight once. cuBLAS
picks tile shapes made for large M, so small matrices spend more time in launch and tile setup
than in reading bytes; here each program streams a few contiguous rows of W with wide loads, and
the small ops around the matmul ride along in the same launch (constexpr flags):

- NORM: RMSNorm prologue. The input is the residual stream h; every program recomputes the row
  norms itself (K <= 8192: a second pass over a few KB that sits in L2) instead of a norm launch.
  At M > 1 on large weights the norm is launched apart instead (separate_norm: there the rereads of
  16 rows by every program cost more than a launch).
- RESIDUAL: out = residual + x @ W^T (o_proj, down_proj adding into the residual stream).
- SWIGLU: W is the fused gate_up [2 * I, K]; out[:, j] = silu(gate_j) * up_j, one launch for the
  gate_up matmul and the activation.
- bias (Qwen2's qkv).
- compressed weights (QUANT, kernels/quant.py's layouts): int8 codes with one scale per output
  column, applied to the column's sum; or int4 codes packed two per byte with a scale (and zero
  point) per group of GROUP inputs, dequantized in registers as each tile is loaded. The codes are
  read once; the rest of the kernel is unchanged, so every fusion works on them. W8A8 int8
  (QUANT 3): int8 codes as QUANT 1, and the input quantized per row in the prologue (dynamic,
  symmetric: absmax / 127.5 after the norm, an IEEE division as kernels/quant.py's, round half to even),
  the sums scaled by the row's and the column's scales.
- fast dequantization (``fast``, M == 1): the exact path above converts
  every code with an int -> float conversion and rounds every dequantized weight to the dtype
  (two more conversions), and conversions run at a fraction of the FMA rate: int4 was bound by
  them at a quarter of the copy ceiling. The fast path reads the codes as int32 words (8 int4 or
  4 int8 codes) and makes each code a float with the magic-number trick: OR-ing c (< 2^23) into
  the mantissa of 2^23 and subtracting 2^23 gives c exactly (one LOP3 and one FADD; the code
  offset rides in the subtracted constant, and a code left in place at bit 4s is c * 16^s,
  whose factor is taken out of x instead of shifting the word). Per word the products are
  summed, the zero point enters as - z * sum(x), the group scale once per word; the int8
  column scale once per column. No dequantized weight is rounded to the dtype: the result is
  x @ W^T with W dequantized in fp32 (kernels/quant.py's fast references), rounded once. int8 and
  W8A8 at M == 1 (_matmul_fast): a program's words of a K step in one load, two steps in flight,
  each code's input gathered per code (a 16-bit load each), per code an extract, OR, FADD and
  FFMA. int4 at M == 1 (_matmul_fast_runs): each thread reads runs of FAST_INT4_RUN (8) consecutive
  words of a row (two 128-bit loads; 4, one load, until 8 measured faster) and exactly those words'
  inputs (a contiguous run, split by code in registers: no gather, and no shared-memory shuffle where
  a step's runs cover every warp), sums a run before its one zero-point and scale; the K loop
  unrolled up to FAST_UNROLL steps, else two steps an iteration, masked along K only where a step
  reaches past it. int8 on that run layout (one PRMT a
  code, 4.9 SASS instructions a weight byte at (8, 4096, 4) on 4096 x 4096 against 5.7 here:
  experiments/gemv_sass_count.py) was slower on the H200 at every Llama-2-7B shape, each path at
  its best swept config (M = 1, us, _matmul_fast / runs: qkv 18.3 / 27.3, o_proj 7.3 / 9.6, gate_up
  29.9 / 42.3, down 17.0 / 23.6; bf16 26.9 / 10.5 / 44.9 / 24.2; 7B decode at batch 1 0.86x bf16
  against 1.36x with _matmul_fast: benchmarks/2026-11-30-h200x2-s12/bg/g1, int8_sweep_old.jsonl
  against int8_sweep_..jsonl), and was removed: fewer instructions a byte did not buy time here.
  At 1 < M <= SMALL_M every format takes the exact path. A tl.dot variant for int4 there (nibbles
  OR-ed into 16-bit float bits as exact dot operands, one K step a group) was 3-7x slower than the
  exact path on the H200 at M = 2 and 16, even at the best of 144 configs (int4_g128 down M=16:
  25.5 vs 120.9 us; 7B decode at batch 16: 0.29x bf16 against 0.81x;
  benchmarks/2026-11-30-h200x2-s11/bg/g1/int4_dot.jsonl), and was removed. A multi-row multiply-reduce
  for dense 16-bit W at 2-8 rows (M == 1's tile loaded once, each row's products in registers, the
  cross-thread sums once after the K loop) lost too: on the 7B shapes its time grew with every row
  (o_proj 19.0 / 22.9 / 42.6 / 56.9 us at M = 2 / 3 / 5 / 8 against the 16-row tl.dot tiles' 12.0-12.1
  and cuBLAS's 12.4-12.7; qkv + rope at M = 2 45.9 against 63.0 and cuBLAS 27.8), the engine's startup
  timing gave the fused decode 7,031 / 12,300 / 23,248 us a forward at batch 2 / 4 / 8 against 6,088 /
  6,065 / 6,070 with the tl.dot tiles; it won only at M = 2 on SmolLM2-135M's latency-bound shapes
  (2.2-3.7 us against 2.5-5.5), and was removed (H200, experiments/gemv_sweep.py at a144dca,
  benchmarks/2026-11-30-h200x2-s15/mr/).
- split-K (``split_k``, the exact path; off unless asked for, not yet timed): at M > 1 the 16-row
  tl.dot tiles of N 4096 (o_proj, down_proj) make 128 programs of 4 warps, one an SM, each with 8
  KB of int8 codes (bf16: 16 KB) and as many bytes of x a K step in flight, so int8 ran as slow
  as bf16 there (Llama-2-7B batch 16: 1.00x, BENCHMARKS.md). Each tile's K in split_k programs
  instead; each stores its fp32 partials, and the last of a tile to arrive (an atomic count)
  sums them in their fixed order and runs the fused epilogue: no second launch, the same result
  whichever program is last. experiments/quant_gemv_sweep.py times it ("exact_split").
- 2:4 + int4 weights: kernels/quant_gemv.py's fast 2:4 kernel takes the same NORM / SWIGLU /
  RESIDUAL flags and runs this module's row stats, normalised inputs (_row_stats, _fast_x) and
  epilogues (_epilogue, _rope_store_epilogue); kernels/decode_gemv.py is the one entry that
  routes each format to its kernel (quant_gemv imports this module, so this one cannot import it).
- rotary + KV store (gemv_rope_store, a sibling kernel on the same matmul code): the qkv matmul's
  epilogue rotates q and k (neox layout) and writes k and v straight into the paged cache, so the
  separate rope_store launch (kernels/rotary.py) goes away. Each program computes both members of
  its rotary pairs: output column c of a head's first half and c + head_dim / 2.

Batch invariance (``batch_invariant``, EngineConfig.batch_invariant): a row's output must not depend
on how many rows share the launch, so that a speculative verify (k + 1 rows a sequence) scores a token
bit for bit as a decode step does. The M == 1 multiply-reduce and the M > 1 tl.dot reduce K in
different orders, and so do tl.dot tiles of other BLOCK_K; with the flag every M, 1 included, takes the
one config of SMALL_M rows (batch_invariant_config: BLOCK_K and the tl.dot instruction fixed by N and
K alone), past SMALL_M rows a second grid axis over 16-row tiles, and no fast dequantization (its M == 1
and M > 1 paths differ too). A row's products and sums are then the same instructions on the same
operands wherever the row sits in its tile: its output is bitwise the same at any M.

Rounding follows the unfused modules so bf16 results match them: the norm as kernels/rmsnorm.py,
the matmul output rounded to the input dtype before bias-free epilogues (residual add, silu), as
separate launches would round it. Block sizes come from a fixed heuristic, not autotuning: the
decode forward is captured in CUDA graphs, where autotuning (timing runs, syncs) cannot happen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, interpreting, next_pow2, pdl_launch_args, tl, triton
from kernels.activation import silu_and_mul_ref
from kernels.kv_store import store_kv_ref
from kernels.quant import FP8_MAX, INT8_HALF_RANGE, fp32_weight_linear_ref
from kernels.rmsnorm import rmsnorm, rmsnorm_ref

SMALL_M = 16  # most rows the skinny GEMM takes; larger batches go to cuBLAS
MAX_NORM_K = 8192  # the norm prologue rereads the input rows in every program: keep them small
LATENCY_BYTES = 4 << 20  # weights below this are latency bound, above bandwidth bound (M == 1 and M > 1)
MAX_TILE = 16384  # W elements a program loads per K step at M == 1 (all its tiles)


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    residual: torch.Tensor | None = None, swiglu: bool = False,
) -> torch.Tensor:
    """The unfused modules, in their order: rmsnorm, linear (+bias), silu_and_mul, residual add.
    A weight of another dtype than x (the fast path's fp32 dequantized weights) multiplies as
    kernels/quant.py's fp32_weight_linear_ref: in fp32, rounded once to x's dtype."""
    if norm_weight is not None:
        x = rmsnorm_ref(x, norm_weight, eps)
    y = F.linear(x, weight, bias) if weight.dtype == x.dtype else fp32_weight_linear_ref(x, weight, bias)
    if swiglu:
        y = silu_and_mul_ref(y)
    if residual is not None:
        y = y + residual
    return y


def _rotate_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """neox rotation as kernels/rotary.py's rope_store kernel computes it: fp32 operands (the fp32
    tables, not cast to the activation dtype), one rounding to x's dtype at the end."""
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def gemv_rope_store_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int,
) -> torch.Tensor:
    """Today's unfused path in torch: the qkv matmul (norm prologue, bias) rounded to the dtype,
    then rope_store's rotation of q and k; k and v stored at slot_mapping (slot < 0: padding row,
    nothing stored). Returns the rotated q [M, num_heads * head_dim]."""
    head_dim = k_cache.shape[-1]
    qkv = gemv_ref(x, weight, bias, norm_weight=norm_weight, eps=eps)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos = cos_table[positions].unsqueeze(1)
    sin = sin_table[positions].unsqueeze(1)
    q = _rotate_fp32(q.reshape(-1, num_heads, head_dim), cos, sin)
    k = _rotate_fp32(k.reshape(-1, num_kv_heads, head_dim), cos, sin)
    store_kv_ref(k, v.reshape(-1, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return q.reshape(-1, num_heads * head_dim)


def separate_norm(m: int, weight: torch.Tensor, batch_invariant: bool) -> bool:
    """Whether gemv / gemv_rope_store normalise x in a launch of their own (kernels/rmsnorm.py) instead of
    the norm prologue: at M > 1 on large weights (>= LATENCY_BYTES), not in batch-invariant mode (whose
    rows must reduce the same way at every M, M == 1 included). The prologue has every program reread and
    renormalise its 16 rows over all of K; on the H200 at the Llama-2-7B shapes that made the two kernels
    that carry a norm 1.3-2x slower than the same kernel after a norm launch (us at 16 rows, norm launch
    included, each at its best config: qkv + rope 39.0 against 31.1, bf16; 28.4 against 22.2, int8; gate_up
    + SwiGLU 63.4 against 47.5 and 37.3 against 29.9; cuBLAS alone 28.4 and 46.8; 2 and 8 rows alike:
    benchmarks/2026-11-30-h200x2-s16/g0/rows.jsonl). Small weights (SmolLM2's) keep the prologue: there a
    launch costs more than the reread."""
    return large_rows(m, weight) and not batch_invariant


def large_rows(m: int, weight: torch.Tensor) -> bool:
    """M > 1 rows on a weight of >= LATENCY_BYTES: the 16-row tl.dot tiles of a large matrix, launched
    without PDL (programmatic dependent launch). There every program holds a tl.dot tile's registers,
    and the next kernel's programs, let in early by PDL, sat on SMs waiting while this kernel's later
    waves needed them: on the H200, Llama-2-7B at 16 rows, a decode step's graph took 4,355 us with PDL
    and 3,313 us without (int8; bf16 4,487 and 4,316), the attention kernel after the qkv one reading
    26-34 us with PDL and 8.6 without (eval.bench profile --variant, BENCHMARKS.md, sixteenth session).
    At M == 1 PDL stays: its programs are light and it hid SmolLM2's launch gaps (gemv_config)."""
    return m > 1 and weight.numel() * weight.element_size() >= LATENCY_BYTES


def _norm_apart(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                batch_invariant: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input, norm weight) for gemv / gemv_rope_store's kernel: x normalised by a launch of its own and no
    prologue where separate_norm says so, else unchanged."""
    if norm_weight is None or not separate_norm(x.shape[0], weight, batch_invariant):
        return x, norm_weight
    return _norm_launch(x, norm_weight, eps), None


def _norm_launch(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """separate_norm's launch: kernels/rmsnorm.py's kernel on a GPU, its torch reference elsewhere (the
    interpreter rounds 16-bit floats wrong in that kernel; the engine's CPU path normalises in torch)."""
    return rmsnorm(x, norm_weight, eps) if x.is_cuda else rmsnorm_ref(x, norm_weight, eps)


def batch_invariant_config(n: int, k: int) -> tuple[int, int, int, int]:
    """The one launch config of every M in batch-invariant mode (module docstring): gemv_config's at
    SMALL_M rows, a function of N and K alone; M past SMALL_M is a grid over BLOCK_M-row tiles."""
    return gemv_config(SMALL_M, n, k)


def _small_rows_tile(rows: int, k: int, elem_bytes: float) -> bool:
    """Whether a weight of ``rows`` W rows takes the small-weight tiles at M > 1: 16-bit, K <= 1024,
    latency bound (SmolLM2's qkv, o_proj and gate_up). Without SwiGLU that is one K step of next_pow2(K),
    each program's whole W tile loaded before the PDL wait (_matmul), where 256-wide steps left two of
    three to load after it. H200, CUDA graphs, PDL, 2 / 5 / 16 rows (experiments/gemv_sweep.py --wide,
    benchmarks/2026-12-02-h200-s26/lease3/wide.jsonl): o_proj + residual 2.04 / 2.06 / 2.15 us against
    2.54 / 2.55 / 2.63. 16-bit only: the int8 / int4 tiles were not swept so."""
    return rows * k * elem_bytes < LATENCY_BYTES and elem_bytes >= 2 and k <= 1024


def gemv_config(m: int, n: int, k: int, two: bool = False, pdl: bool = True,
                elem_bytes: float = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows, N output columns, K inputs; ``two``: each
    output column reads two W rows (SwiGLU's gate and up); ``pdl``: launched with programmatic
    dependent launch; ``elem_bytes``: bytes a weight element (2 for 16-bit floats, 1 int8, 0.5 int4).

    M == 1: a multiply-reduce over [BLOCK_N, BLOCK_K] tiles on the CUDA cores, from an H100 sweep
    of the decode shapes of SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B in CUDA graphs
    (experiments/gemv_sweep.py, BENCHMARKS.md). Two regimes:
    - small matrices (< LATENCY_BYTES, SmolLM2's): latency bound. With PDL, about 128+ programs
      of up to 8 columns with 4 warps: fewer, fuller programs, whose first tile loads while the
      kernel before drains (SmolLM2 graph 505 -> 446 us). Without PDL that is slower (570-586 ->
      654 us): there >= 256 programs of 8192-element tiles, as before the sweep.
    - large ones: bandwidth bound. >= 512 programs, K steps of 2048 (4096 from K 8192), up to
      16384 W elements in flight per program (8 warps there): 2.7-3.1 TB/s of reads on Llama-2-7B
      shapes, against 2.4-2.7 with the earlier 1024-wide steps.
    M > 1: tl.dot on a 16-row tile (its minimum), the padding rows cost registers, not memory traffic.
    Large weights (>= LATENCY_BYTES) at M > 1, from an H200 sweep of the Llama-2-7B shapes at 2, 8 and
    16 rows with the norm launched apart (separate_norm; experiments/gemv_sweep.py --m, 2026-11-30,
    benchmarks/2026-11-30-h200x2-s16/g0/rows.jsonl, us at 16 rows): K steps of 512 past K 8192 (down_proj
    bf16 26.8 against 29.1 at 256, int8 24.0 against 25.4); 128 for SwiGLU's two 16-bit tiles (47.5
    against 53.4; int8 keeps 256: 29.9 against 31.5). int4 was not swept: its configs are the earlier ones.
    """
    if m == 1:
        block_k = max(16, min(next_pow2(k), 2048 if k < 8192 else 4096))
        rows = 2 if two else 1
        small = n * rows * k * 2 < LATENCY_BYTES
        if small and not pdl:
            block_k = max(16, min(next_pow2(k), 2048))
            block_n = 1
            while block_n < 64 and triton.cdiv(n, block_n * 2) >= 256:
                block_n *= 2
            while block_n > 1 and block_n * rows * block_k > 8192:
                block_n //= 2
            return 1, block_n, block_k, max(1, min(8, block_n * block_k // (32 * 16)))
        target = 128 if small else 512
        block_n = 8
        while block_n > 1 and (triton.cdiv(n, block_n) < target or block_n * rows * block_k > MAX_TILE):
            block_n //= 2
        num_warps = 8 if not small and block_n * rows * block_k >= MAX_TILE else 4
        return 1, block_n, block_k, min(num_warps, max(1, block_n * rows * block_k // (32 * 8)))
    block_n = 16 if triton.cdiv(n, 32) < 64 else 32
    if _small_rows_tile(n * (2 if two else 1), k, elem_bytes):
        if two:  # SmolLM2's gate_up + SwiGLU: 4.66 us at 2 and 5 rows against 4.95 with 16 columns
            return 16, 32, 256, 4
        return 16, block_n, next_pow2(k), 4
    large = n * (2 if two else 1) * k * elem_bytes >= LATENCY_BYTES
    # 512-wide K steps helped SmolLM2's down_proj (K 1536); at Llama-7B's K (4096+) 256 did as well.
    block_k = max(32, min(next_pow2(k), 512 if 1024 <= k <= 2048 else 256))
    if large and two and elem_bytes >= 2:
        block_k = 128
    elif large and not two and k >= 8192 and elem_bytes >= 1:  # int4 unmeasured: as before
        block_k = 512
    return 16, block_n, block_k, 2 if (block_n, block_k) == (16, 512) else 4


# The fast path's M == 1 configs, per format: (BLOCK_N, BLOCK_K, num_warps) of a program reading one
# W row set (SwiGLU's and rotary's programs read two: half the columns). First guesses: a program
# holds about as many weight bytes per K step as the bf16 path's (16-32 KB, two steps in flight);
# experiments/quant_gemv_sweep.py prints the measured best per format and shape to set them from.
FAST_M1_CONFIGS: dict[str, tuple[int, int, int]] = {  # H200 sweep, benchmarks/2026-11-29-h200-s5/quant_sweep.jsonl
    # int8 (_matmul_fast): the best total over the four Llama-2-7B shapes of 18 candidates, 74.5 us: qkv
    # 18.3, o_proj 7.3, gate_up 29.9, down 18.9 (17.0 at (32, 1024, 8), 17.5 at (8, 2048, 4), whose total
    # is 80.3); H200, benchmarks/2026-11-30-h200x2-s12/bg/g1/int8_sweep_old.jsonl ("suggest").
    "int8": (8, 4096, 4),
    "w8a8_int8": (16, 2048, 4),  # 113.9 us over the four Llama-2-7B shapes against 121.6 at (8, 2048, 4)
    "int4": (8, 2048, 4),
}
# Whether the engine's compressed linears take the fast path by default (ModelOptions.exact_dequant
# forces the exact one everywhere). Measured on the H200 at M == 1: int8's fast path streams 2.2-3.0
# TB/s against the exact path's 1.2-1.5 (benchmarks/2026-11-29-h200-s5/quant_sweep.jsonl); int4's
# (_matmul_fast_runs) 1.25-1.88 TB/s against the exact path's 0.93-1.13 on every Llama-2-7B shape
# and format (int4_g64, int4_g128, int4_g128_zero), and the 7B decode at batch 1 int4_g128 373.7
# tok/s against 262.4 exact (1.44x / 1.01x bf16; tinygemm 359.6): H200, 2026-11-30,
# benchmarks/2026-11-30-h200x2-s11/bg/g1/int4_dot.jsonl and bg/q0/quant_int4_fast.jsonl.
FAST_BY_DEFAULT = {"int8": True, "w8a8_int8": True, "int4": True}
# int4's fast path unrolls its K loop up to this many steps (_matmul_fast_runs): two keep every
# word of a K <= 2 * BLOCK_K row set in flight at once; more, unrolled, let ptxas hoist every
# step's loads and spill (K 11008 at (8, 2048, 4): 256 bytes a thread, experiments/gemv_sass_count.py).
FAST_UNROLL = tl.constexpr(2) if HAS_TRITON else 2
# int4's fast path: code words in a thread's run (_matmul_fast_runs). 8 (two 128-bit loads) against 4: at the
# fast path's tile (8, 2048, 4), with PDL, on the Llama-2-7B shapes, a sibling kernel ran 1.13-1.28x faster
# with 8 (experiments/int4_bound.py's t_gemv n8k2048r8 against the engine kernel: qkv 15.2 / 19.4 us, o_proj
# 5.3 / 6.8, gate_up 26.4 / 33.7, down 15.5 / 17.5; H200, benchmarks/2026-12-02-h200-s26/lease3).
FAST_INT4_RUN = 8
# Inline PTX where a GPU compiles the kernels (the interpreter runs their plain-Triton equivalents;
# read at import, as tests/kernels/conftest.py reloads the kernels under the interpreter). int4's
# magic exponent goes into a word by a PRMT: OR-ed in, ptxas folds the OR into each code's AND and
# inside a loop then rebuilds the constant in a fresh register for every code (a MOV a code,
# 2.2 -> 2.0 thousand instructions an iteration at K 11008, (8, 2048, 2): gemv_sass_count.py).
_PTX = tl.constexpr(not interpreting()) if HAS_TRITON else False
# kernels/quant.py's activation scales: absmax divided by these (its docstring: how, and why).
_INT8_HALF_RANGE = tl.constexpr(INT8_HALF_RANGE) if HAS_TRITON else INT8_HALF_RANGE
_FP8_MAX = tl.constexpr(FP8_MAX) if HAS_TRITON else FP8_MAX
FAST_MIN_PROGRAMS = 264  # two per SM of an H100/H200 (132 SMs): fewer columns per program below that
WORD_CODES = {"int8": 4, "w8a8_int8": 4, "int4": 8}  # codes in one int32 word


def fast_dequant_fits(quant: str, k: int, group: int = 1) -> bool:
    """Whether the fast path reads a weight of this format: every row whole int32 words (K a
    multiple of 4 int8 / 8 int4 codes), int4 groups a power of two of whole words."""
    if quant not in WORD_CODES or k % WORD_CODES[quant]:
        return False
    return quant != "int4" or (group >= 8 and group & (group - 1) == 0)


def fast_gemv_config(n: int, k: int, quant: str, group: int = 1, two: bool = False,
                     entry: tuple[int, int, int] | None = None) -> tuple[int, int, int, int]:
    """(1, BLOCK_N, BLOCK_K, num_warps) of the fast path at M == 1: FAST_M1_CONFIGS's entry (or
    ``entry``, a candidate for that table), with K steps no wider than K (at least one int4
    group) and fewer columns per program where N would leave fewer than FAST_MIN_PROGRAMS."""
    block_n, block_k, num_warps = entry or FAST_M1_CONFIGS[quant]
    if two:
        block_n = max(1, block_n // 2)
    block_k = max(group, WORD_CODES[quant], min(block_k, next_pow2(k)))
    while block_n > 1 and triton.cdiv(n, block_n) < FAST_MIN_PROGRAMS:
        block_n //= 2
    return 1, block_n, block_k, num_warps


def _fast_words(quant: str, group: int, block_k: int) -> tuple[int, int]:
    """(GPT, WPG): a fast K step's words as GPT groups of WPG words (int8: one run of words)."""
    codes = WORD_CODES[quant]
    assert block_k & (block_k - 1) == 0 and block_k % codes == 0, f"fast path: BLOCK_K {block_k} is not a power of two"
    if quant != "int4":
        return 1, block_k // codes
    assert block_k % group == 0, f"fast path: BLOCK_K {block_k} is not a multiple of the group size {group}"
    return block_k // group, group // codes


if HAS_TRITON:

    @triton.jit
    def _rnd(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """fp32 v rounded to the nearest dtype value (ties to even), kept in fp32: the kernel rounds
        wherever the unfused modules write a 16-bit tensor, and does its arithmetic in fp32 (for
        16-bit operands the fp32 product or sum is the exact one, rounded once more by _rnd, as
        torch does). The interpreter's fp32 -> bf16 cast truncates: there, round on the bits."""
        if BF16_BY_HAND:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(dtype).to(tl.float32)

    @triton.jit
    def _mac(acc, x, w, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ w[BLOCK_N, BLOCK_K]^T in fp32."""
        if BLOCK_M == 1:
            return acc + tl.sum(w.to(tl.float32) * x.to(tl.float32), 1)[None, :]
        elif IEEE:  # fp32: no tf32 rounding of the inputs
            return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            return acc + tl.dot(x, tl.trans(w))

    @triton.jit
    def _int4_tile(w_rows, s_rows, z_rows, k0, col_mask, dtype: tl.constexpr, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   BF16_BY_HAND: tl.constexpr, W_FP32: tl.constexpr):
        """The int4 W tile at columns k0.. (BLOCK_K a multiple of GROUP, k0 of BLOCK_K): each byte
        loaded once and split into its two codes, one scale (and zero) load per group. Rounded to
        dtype's values; held in fp32 with W_FP32 (see _load_w)."""
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_rows + kb[None, :], mask=col_mask[:, None] & (kb < K // 2)[None, :], other=0).to(tl.int32)
        lo = (byte & 0xF).to(tl.float32) - 8.0
        hi = ((byte >> 4) & 0xF).to(tl.float32) - 8.0
        code = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K // GROUP, GROUP))
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        g_mask = col_mask[:, None] & (g < K // GROUP)[None, :]
        if HAS_ZERO:
            code -= tl.load(z_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)[:, :, None]
        scale = tl.load(s_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        w = _rnd(tl.reshape(code * scale[:, :, None], (BLOCK_N, BLOCK_K)), dtype, BF16_BY_HAND)
        if W_FP32:
            return w
        else:
            return w.to(dtype)

    @triton.jit
    def _load_w(w_rows, s_rows, z_rows, k0, k, w_mask, col_mask, dtype: tl.constexpr, K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                W_FP32: tl.constexpr):
        """The W tile at columns k of the rows w_rows, as x's dtype: dense (QUANT 0); int8 codes
        (QUANT 1: exact in any float dtype, the column scale comes after the sum); int4 (QUANT 2:
        w_rows point at packed rows of K / 2 bytes, dequantized in fp32 and rounded to the dtype
        as kernels/quant.py's reference does; s_rows, z_rows at [N, K / GROUP] scale/zero rows).
        W_FP32 (M == 1, whose multiply-reduce is fp32): a compressed tile stays in fp32, holding
        the same dtype values, without the round trip through dtype (two conversions an element:
        a quarter of the bytes of bf16 leaves int4 with four times the instructions per byte)."""
        if QUANT == 0:
            return tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
        elif QUANT == 1 or QUANT == 3:
            codes = tl.load(w_rows + k[None, :], mask=w_mask, other=0).to(tl.float32)
            if W_FP32:
                return codes
            else:
                return codes.to(dtype)
        elif BLOCK_K % GROUP == 0:
            return _int4_tile(w_rows, s_rows, z_rows, k0, col_mask, dtype, K, BLOCK_N, BLOCK_K, GROUP, HAS_ZERO,
                              BF16_BY_HAND, W_FP32)
        else:  # tiles narrower than a group: per element
            byte = tl.load(w_rows + (k // 2)[None, :], mask=w_mask, other=0).to(tl.int32)
            code = ((byte >> ((k % 2) * 4)[None, :]) & 0xF).to(tl.float32) - 8.0
            g = (k // GROUP)[None, :]
            if HAS_ZERO:
                code -= tl.load(z_rows + g, mask=w_mask, other=0.0).to(tl.float32)
            scale = tl.load(s_rows + g, mask=w_mask, other=0.0).to(tl.float32)
            w = _rnd(code * scale, dtype, BF16_BY_HAND)
            if W_FP32:
                return w
            else:
                return w.to(dtype)

    @triton.jit
    def _input_tile(x_rows, row_mask, k, nw_ptr, rstd, K: tl.constexpr, NORM: tl.constexpr,
                    BF16_BY_HAND: tl.constexpr):
        """The x columns k, normalised with NORM as kernels/rmsnorm.py does."""
        dtype = x_rows.dtype.element_ty
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:  # normalise in fp32, round to the input dtype, scale in the input dtype
            nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0)
            x = _rnd(x.to(tl.float32) * rstd[:, None], dtype, BF16_BY_HAND)
            x = _rnd(nw.to(tl.float32)[None, :] * x, dtype, BF16_BY_HAND).to(dtype)  # exact cast
        return x

    @triton.jit
    def _act_scale(amax, FP8: tl.constexpr):
        """Per-token activation scales from the rows' absmax, as kernels/quant.py's token_scale: an
        IEEE division by 127.5 (int8) or 448 (FP8; Triton's fp32 `/` is an approximate division on
        NVIDIA GPUs, and torch's CUDA `/ 127.5` a product with the reciprocal), eps for an all-zero
        row."""
        if FP8:
            xs = tl.math.div_rn(amax, _FP8_MAX)
        else:
            xs = tl.math.div_rn(amax, _INT8_HALF_RANGE)
        return tl.where(xs == 0.0, 1.1920928955078125e-07, xs)  # torch.finfo(torch.float32).eps

    @triton.jit
    def _quantize(x, xs):
        """round(x / xs) half to even (xs broadcast against x), clamped to int8's range, as fp32
        (kernels/quant.py's quantize_per_token_int8). The division IEEE-rounded, as torch's on
        every device (Triton's fp32 `/` is an approximate division on NVIDIA GPUs). floor(v + 0.5)
        is round half up but at v = 0.49999997 (v + 0.5 rounds to 1.0 in fp32), where r - v rounds
        to 0.5 and the tie correction takes it back to 0."""
        v = tl.math.div_rn(x.to(tl.float32), xs)
        r = tl.floor(v + 0.5)
        r = tl.where(((r - v) == 0.5) & ((r % 2) != 0), r - 1.0, r)
        return tl.minimum(tl.maximum(r, -128.0), 127.0)

    @triton.jit
    def _mac_tile(acc, acc2, x_rows, row_mask, k, w, w2, nw_ptr, rstd, xs,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
                  IEEE: tl.constexpr, BF16_BY_HAND: tl.constexpr, QUANT: tl.constexpr):
        """acc (and acc2) += the x columns k (normalised with NORM, quantized with QUANT 3) times
        the W tiles w (and w2)."""
        dtype = x_rows.dtype.element_ty
        x = _input_tile(x_rows, row_mask, k, nw_ptr, rstd, K, NORM, BF16_BY_HAND)
        if QUANT == 3:  # integers of at most 8 bits: exact in any float dtype
            x = _quantize(x, xs[:, None]).to(dtype)
        acc = _mac(acc, x, w, BLOCK_M, IEEE)
        if TWO:
            acc2 = _mac(acc2, x, w2, BLOCK_M, IEEE)
        return acc, acc2

    @triton.jit
    def _row_stats(x_rows, row_mask, ks, nw_ptr, eps, K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """Each input row's rstd (NORM) and W8A8 activation scale (QUANT 3), [BLOCK_M] (zeros where
        unused): passes over the rows before the matmul's."""
        rstd = tl.zeros([BLOCK_M], tl.float32)
        if NORM:  # sum of squares of each input row, as kernels/rmsnorm.py: fp32, / K, rsqrt
            sq = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + ks
                h = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & (k < K)[None, :], other=0.0)
                h = h.to(tl.float32)
                sq += tl.sum(h * h, 1)
            rstd = tl.rsqrt(sq / K + eps)
        xs = tl.zeros([BLOCK_M], tl.float32)
        if QUANT == 3:  # each row's activation scale: absmax of the (normalised) input / 127.5
            amax = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                h = _input_tile(x_rows, row_mask, k0 + ks, nw_ptr, rstd, K, NORM, BF16_BY_HAND)
                amax = tl.maximum(amax, tl.max(tl.abs(h.to(tl.float32)), 1))
            xs = _act_scale(amax, False)
        return rstd, xs

    @triton.jit
    def _matmul(
        x_rows, row_mask, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask, nw_ptr, eps,
        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, TWO: tl.constexpr, IEEE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
        PDL: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """fp32 [BLOCK_M, BLOCK_N] accumulators of x @ W^T for the W rows at w_rows (pointers
        [BLOCK_N, 1]) and, with TWO, a second set at w_rows2 over the same x tiles (SwiGLU's up
        rows, rotary's second-half rows). NORM: x is RMS-normalised on the fly.

        The weights never depend on the kernel before this one: the first W tile is loaded before
        anything else, and with PDL (programmatic dependent launch) before waiting for that kernel
        to finish, so its memory latency overlaps that kernel's tail. The loop over the other
        tiles is left as it was, for the compiler to pipeline. SPLIT > 1 (split-K): the program
        sums only the inputs of its part of K (grid axis 2), whole BLOCK_K steps of K_PART inputs."""
        dtype = x_rows.dtype.element_ty
        ks = tl.arange(0, BLOCK_K)
        K_PART: tl.constexpr = (K + BLOCK_K * SPLIT - 1) // (BLOCK_K * SPLIT) * BLOCK_K
        k_first = 0
        if SPLIT > 1:
            k_first = tl.program_id(2) * K_PART
        k = k_first + ks
        w_mask = col_mask[:, None] & (k < K)[None, :]
        w = _load_w(w_rows, s_rows, z_rows, k_first, k, w_mask, col_mask, dtype, K, BLOCK_N, BLOCK_K,
                    GROUP, QUANT, HAS_ZERO, BF16_BY_HAND, BLOCK_M == 1)
        w2 = w
        if TWO:
            w2 = _load_w(w_rows2, s_rows2, z_rows2, k_first, k, w_mask, col_mask, dtype, K, BLOCK_N, BLOCK_K,
                         GROUP, QUANT, HAS_ZERO, BF16_BY_HAND, BLOCK_M == 1)
        if PDL:  # x is the previous kernel's output: wait for it, then let the next kernel start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rstd, xs = _row_stats(x_rows, row_mask, ks, nw_ptr, eps, K, BLOCK_M, BLOCK_K, NORM, QUANT, BF16_BY_HAND)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc, acc2 = _mac_tile(acc, acc2, x_rows, row_mask, k, w, w2, nw_ptr, rstd, xs,
                              K, BLOCK_M, NORM, TWO, IEEE, BF16_BY_HAND, QUANT)
        k_end = K
        if SPLIT > 1:
            k_end = tl.minimum(k_first + K_PART, K)
        for k0 in range(k_first + BLOCK_K, k_end, BLOCK_K):
            k = k0 + ks
            w_mask = col_mask[:, None] & (k < K)[None, :]
            w = _load_w(w_rows, s_rows, z_rows, k0, k, w_mask, col_mask, dtype, K, BLOCK_N, BLOCK_K,
                        GROUP, QUANT, HAS_ZERO, BF16_BY_HAND, BLOCK_M == 1)
            w2 = w
            if TWO:
                w2 = _load_w(w_rows2, s_rows2, z_rows2, k0, k, w_mask, col_mask, dtype, K, BLOCK_N, BLOCK_K,
                             GROUP, QUANT, HAS_ZERO, BF16_BY_HAND, BLOCK_M == 1)
            acc, acc2 = _mac_tile(acc, acc2, x_rows, row_mask, k, w, w2, nw_ptr, rstd, xs,
                                  K, BLOCK_M, NORM, TWO, IEEE, BF16_BY_HAND, QUANT)
        if QUANT == 3:  # the row scales; the column scales follow (_column_scale)
            acc = acc * xs[:, None]
            acc2 = acc2 * xs[:, None]
        return acc, acc2

    @triton.jit
    def _fast_x(x_ptr, k, nw_ptr, rstd, xs, K: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr,
                BF16_BY_HAND: tl.constexpr):
        """Row 0's input at the columns k (any shape) in fp32: normalised as _input_tile does with
        NORM (rstd: the row's scalar), quantized with QUANT 3 (xs: the row's scale)."""
        dtype = x_ptr.dtype.element_ty
        k_mask = k < K
        x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0)
            x = _rnd(x * rstd, dtype, BF16_BY_HAND)
            x = _rnd(nw.to(tl.float32) * x, dtype, BF16_BY_HAND)
        if QUANT == 3:
            x = _quantize(x, xs)
        return x

    @triton.jit
    def _fast_tile(w_rows, k0, col_mask, K: tl.constexpr, BLOCK_K: tl.constexpr, GPT: tl.constexpr,
                   WPG: tl.constexpr):
        """int8's (and W8A8's) code words [BLOCK_N, GPT, WPG] (GPT = 1: one run of words) of inputs
        k0 .. k0 + BLOCK_K of the rows at w_rows (int4 has its own: _int4_fast_tile)."""
        CODES: tl.constexpr = BLOCK_K // (GPT * WPG)
        g = k0 // (WPG * CODES) + tl.arange(0, GPT)
        j = g[:, None] * WPG + tl.arange(0, WPG)[None, :]
        return tl.load(w_rows[:, :, None] + j[None, :, :],
                       mask=col_mask[:, None, None] & (j < K // CODES)[None, :, :], other=0)

    @triton.jit
    def _fast_code(src, SHIFT: tl.constexpr):
        """int8's code at bit SHIFT of each int32 word src as an exact fp32 by the magic-number
        trick: the byte, its sign bit already flipped (byte ^ 0x80 = byte + 128), shifted down
        (the compiler makes the extract a PRMT) and OR-ed into the mantissa of 2^23 (0x4B000000)
        makes the float 2^23 + byte + 128; subtracting 2^23 + 128 leaves the code."""
        bits = ((src >> SHIFT) & 0xFF) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _fast_mac(acc, acc2, words, words2, x_ptr, k0, nw_ptr, rstd, xs,
                  K: tl.constexpr, BLOCK_K: tl.constexpr, GPT: tl.constexpr, WPG: tl.constexpr,
                  QUANT: tl.constexpr, TWO: tl.constexpr, NORM: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """acc (and acc2) [BLOCK_N, GPT, WPG] += per int8 word: the sum over its codes of code * x
        (its column scale comes after the K loop). Each x value is loaded and prepared once for all
        the program's rows. The word's sign bits are flipped once, then per byte an extract, OR,
        FADD and FFMA."""
        CODES: tl.constexpr = BLOCK_K // (GPT * WPG)
        kw = (k0 // (WPG * CODES) + tl.arange(0, GPT))[:, None] * (WPG * CODES) \
            + tl.arange(0, WPG)[None, :] * CODES  # first input of each word [GPT, WPG]
        flipped = words ^ -0x7F7F7F80  # 0x80808080: each byte + 128, unsigned
        flipped2 = flipped
        if TWO:
            flipped2 = words2 ^ -0x7F7F7F80
        for c in tl.static_range(4):
            xc = _fast_x(x_ptr, kw + c, nw_ptr, rstd, xs, K, NORM, QUANT, BF16_BY_HAND)[None, :, :]
            acc += _fast_code(flipped, 8 * c) * xc
            if TWO:
                acc2 += _fast_code(flipped2, 8 * c) * xc
        return acc, acc2

    @triton.jit
    def _matmul_fast(
        x_ptr, w_rows, w_rows2, col_mask, nw_ptr, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
        BF16_BY_HAND: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr, GPT: tl.constexpr, WPG: tl.constexpr,
    ):
        """_matmul at M == 1 on int8 code words (FAST; W8A8 with QUANT 3): [1, BLOCK_N] fp32
        accumulators. The next tile's words are loaded before the current one is multiplied (two
        tiles in flight per program); the first before the PDL wait, as _matmul's. Each x value is
        gathered per code (a 16-bit load each). int4 has the run layout (_matmul_fast_runs); int8 on
        it was slower on the H200 (module docstring), and W8A8 on it (x quantized per element as it
        is split) counted worse on sm_90 at (8, 2048, 4): 8.75 SASS a weight byte against 8.41 here at
        K 4096, and at K 11008 255 registers with 160 bytes spilled against 153 and none
        (experiments/gemv_sass_count.py)."""
        words = _fast_tile(w_rows, 0, col_mask, K, BLOCK_K, GPT, WPG)
        words2 = words
        if TWO:
            words2 = _fast_tile(w_rows2, 0, col_mask, K, BLOCK_K, GPT, WPG)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.arange(0, 1)
        rstd, xs = _row_stats(x_ptr + row[:, None], row < 1, tl.arange(0, BLOCK_K), nw_ptr, eps, K, 1, BLOCK_K,
                              NORM, QUANT, BF16_BY_HAND)
        rstd = tl.sum(rstd, 0)
        xs = tl.sum(xs, 0)
        acc = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
        acc2 = acc
        for k0 in range(0, K, BLOCK_K):
            next_words = _fast_tile(w_rows, k0 + BLOCK_K, col_mask, K, BLOCK_K, GPT, WPG)
            next_words2 = next_words
            if TWO:
                next_words2 = _fast_tile(w_rows2, k0 + BLOCK_K, col_mask, K, BLOCK_K, GPT, WPG)
            acc, acc2 = _fast_mac(acc, acc2, words, words2, x_ptr, k0, nw_ptr, rstd, xs,
                                  K, BLOCK_K, GPT, WPG, QUANT, TWO, NORM, BF16_BY_HAND)
            words = next_words
            words2 = next_words2
        out = tl.sum(tl.sum(acc, 2), 1)[None, :]
        out2 = tl.sum(tl.sum(acc2, 2), 1)[None, :]
        if QUANT == 3:  # the row scale; the column scales follow (_column_scale)
            out = out * xs
            out2 = out2 * xs
        return out, out2

    @triton.jit
    def _int4_fast_tile(w_rows, s_rows, z_rows, k0, col_mask, K: tl.constexpr, GROUP: tl.constexpr,
                        HAS_ZERO: tl.constexpr, R: tl.constexpr, T: tl.constexpr, MASK_K: tl.constexpr):
        """int4's code words [BLOCK_N, R, T] of inputs k0 .. k0 + R * T * 8 of the rows at w_rows,
        word t * R + r at [:, r, t] (R consecutive words, one 128-bit load, make a thread's run:
        _int4_fast_x lays x out the same way), their group scales and zero points ([BLOCK_N, 1, T]
        where a run is within one group, else [BLOCK_N, R, T]; zeros without HAS_ZERO). MASK_K:
        the step may reach past K (a ragged or prefetched step); otherwise only the columns are
        masked, constant along each run."""
        WPG: tl.constexpr = GROUP // 8
        t = k0 // (8 * R) + tl.arange(0, T)
        j = t[None, :] * R + tl.arange(0, R)[:, None]  # [R, T] word index within the row
        if WPG % R == 0:
            g = (t * R // WPG)[None, :]
        else:
            g = j // WPG
        w_mask = col_mask[:, None, None]
        g_mask = col_mask[:, None, None]
        if MASK_K:
            w_mask = w_mask & (j < K // 8)[None, :, :]
            g_mask = g_mask & (g < K // GROUP)[None, :, :]
        words = tl.load(w_rows[:, :, None] + j[None, :, :], mask=w_mask, other=0)
        scale = tl.load(s_rows[:, :, None] + g[None, :, :], mask=g_mask, other=0.0).to(tl.float32)
        zero = scale
        if HAS_ZERO:
            zero = tl.load(z_rows[:, :, None] + g[None, :, :], mask=g_mask, other=0.0).to(tl.float32)
        return words, scale, zero

    @triton.jit
    def split8(x, R: tl.constexpr, T: tl.constexpr):
        """x [R, T, 8] as its 8 slices [R, T] along the last axis, by tl.split alone (registers)."""
        even, odd = tl.split(tl.reshape(x, (R, T, 2, 2, 2)))  # the last axis: bit 0 of the index
        e0, e1 = tl.split(even)
        o0, o1 = tl.split(odd)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _int4_fast_x(x_ptr, k0, nw_ptr, rstd, K: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                     NORM: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """The step's inputs k0 .. k0 + R * T * 8 as the 8 codes' operands [R, T] (x[8 w + c] for
        code c of word w = t * R + r, indexed as _int4_fast_tile's words), each times 2^-s of its
        code's bit position in the word (_int4_fast_mac), and their sum per word. Loaded 128 bits
        at a time and split in registers; where the step's T runs cover every warp (BLOCK_K >=
        1024 * num_warps) each thread loads exactly the x of its own runs, else the compiler
        moves the split operands through shared memory."""
        r = tl.arange(0, R)[:, None, None]
        t = tl.arange(0, T)[None, :, None]
        c = tl.arange(0, 8)[None, None, :]
        x = _fast_x(x_ptr, k0 + (t * R + r) * 8 + c, nw_ptr, rstd, 0.0, K, NORM, 2, BF16_BY_HAND)
        x0, x1, x2, x3, x4, x5, x6, x7 = split8(x, R, T)
        xw = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        return (x0, x1 * 0.0625, x2 * 0.00390625, x3 * 0.000244140625, x4 * 0.0000152587890625,
                x5 * 0.00390625, x6 * 0.000244140625, x7 * 0.0000152587890625), xw

    @triton.jit
    def _int4_code(src, SHIFT: tl.constexpr):
        """The int4 code at bit SHIFT of src as an exact fp32 by the magic-number trick: src is a
        word with the exponent of 2^23 already OR-ed in (word | 0x4B000000); AND-ing away its
        other bits (but the exponent's) leaves the float 2^23 + u * 2^SHIFT (u = code + 8, SHIFT
        <= 16), minus 2^23 + 8 * 2^SHIFT the code times 2^SHIFT (the caller takes the 2^SHIFT out
        of x). One immediate per instruction: one LOP3 a code, where (w & mask) | magic took two."""
        bits = src & (0x4B000000 | (0xF << SHIFT))
        return bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << SHIFT))

    @triton.jit
    def _int4_fast_mac(acc, words, scale, zero, xs, xw, HAS_ZERO: tl.constexpr):
        """acc ([BLOCK_N, 1, T] or [BLOCK_N, R, T], as scale) += per word: sum over its 8 codes of
        (u - 8) * x, minus zero * sum(x) (xw), times its group's scale (per run of words where the
        run is in one group). Codes 0..4 in place at bits 4c of the word, 5..7 in place in one copy
        shifted down 12 bits (bits 8..16; LEA.HI adds the exponent), x already times 2^-s
        (_int4_fast_x): per code one LOP3, FADD and FFMA (_int4_code)."""
        if _PTX:  # the same bits under _int4_code's mask: w's bytes 0..2, byte 3 the exponent's 0x4B
            lo = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x4B000000, 0x7210;", "=r,r", [words],
                                           dtype=tl.int32, is_pure=True, pack=1)
        else:
            lo = words | 0x4B000000
        hi = (words.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True) + 0x4B000000
        p = _int4_code(lo, 0) * xs[0][None, :, :]
        for c in tl.static_range(1, 5):
            p += _int4_code(lo, 4 * c) * xs[c][None, :, :]
        for c in tl.static_range(5, 8):
            p += _int4_code(hi, 4 * c - 12) * xs[c][None, :, :]
        if acc.shape[1] == 1:  # a thread's run in one group: its words' sums first, then one zero and scale
            p = tl.sum(p, 1, keep_dims=True)
            xw = tl.sum(xw, 0, keep_dims=True)
        if HAS_ZERO:
            p -= zero * xw[None, :, :]
        return acc + p * scale

    @triton.jit
    def _int4_fast_tiles(w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, k0, col_mask, K: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                         MASK_K: tl.constexpr, TWO: tl.constexpr):
        """_int4_fast_tile's (words, scale, zero) of the step at k0 for the first row set and, with
        TWO, the second (else the first's again, unused)."""
        tile = _int4_fast_tile(w_rows, s_rows, z_rows, k0, col_mask, K, GROUP, HAS_ZERO, R, T, MASK_K)
        tile2 = tile
        if TWO:
            tile2 = _int4_fast_tile(w_rows2, s_rows2, z_rows2, k0, col_mask, K, GROUP, HAS_ZERO, R, T, MASK_K)
        return tile, tile2

    @triton.jit
    def _int4_fast_step(acc, acc2, tiles, x_ptr, k0, nw_ptr, rstd, K: tl.constexpr, R: tl.constexpr,
                        T: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BF16_BY_HAND: tl.constexpr):
        """acc (and acc2) += the step at k0: its x loaded once for both row sets' tiles
        (_int4_fast_tiles)."""
        xc, xw = _int4_fast_x(x_ptr, k0, nw_ptr, rstd, K, R, T, NORM, BF16_BY_HAND)
        words, scale, zero = tiles[0]
        acc = _int4_fast_mac(acc, words, scale, zero, xc, xw, HAS_ZERO)
        if TWO:
            words2, scale2, zero2 = tiles[1]
            acc2 = _int4_fast_mac(acc2, words2, scale2, zero2, xc, xw, HAS_ZERO)
        return acc, acc2

    @triton.jit
    def _matmul_fast_runs(
        x_ptr, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask, nw_ptr, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
        BF16_BY_HAND: tl.constexpr, PDL: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
        RUN: tl.constexpr,
    ):
        """The fast path at M == 1 for int4 (QUANT 2) in runs of RUN words a thread: [1, BLOCK_N] fp32
        accumulators. Each step's words are loaded one step ahead of their use, the first before the
        PDL wait. Up to FAST_UNROLL steps the K loop is unrolled (K <= 2 * BLOCK_K: the whole row
        set in flight at once); longer ones loop two steps an iteration, the tiles alternating
        between two sets of registers (a one-step loop copies the prefetched tile into the current
        one's: a MOV a word). Only a step reaching past K is masked along the words (the ragged last one, and
        in the loop every step of a ragged K); the loop's prefetch past the last step reloads it."""
        R: tl.constexpr = RUN if BLOCK_K >= 8 * RUN else BLOCK_K // 8  # words in a thread's run (_int4_fast_tile)
        T: tl.constexpr = BLOCK_K // (8 * R)
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        RAGGED: tl.constexpr = K % BLOCK_K != 0
        LAST: tl.constexpr = (STEPS - 1) * BLOCK_K
        a = _int4_fast_tiles(w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, 0, col_mask, K, GROUP, HAS_ZERO,
                             R, T, STEPS == 1 and RAGGED, TWO)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.arange(0, 1)
        rstd, xs = _row_stats(x_ptr + row[:, None], row < 1, tl.arange(0, BLOCK_K), nw_ptr, eps, K, 1, BLOCK_K,
                              NORM, 2, BF16_BY_HAND)
        rstd = tl.sum(rstd, 0)
        acc = tl.zeros([BLOCK_N, 1 if (GROUP // 8) % R == 0 else R, T], tl.float32)  # as the scales
        acc2 = acc
        if STEPS <= FAST_UNROLL:
            for step in tl.static_range(STEPS):
                b = a
                if step + 1 < STEPS:
                    b = _int4_fast_tiles(w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, (step + 1) * BLOCK_K,
                                         col_mask, K, GROUP, HAS_ZERO, R, T, step + 2 == STEPS and RAGGED, TWO)
                acc, acc2 = _int4_fast_step(acc, acc2, a, x_ptr, step * BLOCK_K, nw_ptr, rstd, K, R, T, NORM, TWO,
                                            HAS_ZERO, BF16_BY_HAND)
                a = b
        else:
            for k0 in range(0, (STEPS // 2) * 2 * BLOCK_K, 2 * BLOCK_K):
                b = _int4_fast_tiles(w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, k0 + BLOCK_K, col_mask,
                                     K, GROUP, HAS_ZERO, R, T, RAGGED, TWO)
                acc, acc2 = _int4_fast_step(acc, acc2, a, x_ptr, k0, nw_ptr, rstd, K, R, T, NORM, TWO, HAS_ZERO,
                                            BF16_BY_HAND)
                a = _int4_fast_tiles(w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2,
                                     tl.minimum(k0 + 2 * BLOCK_K, LAST), col_mask, K, GROUP, HAS_ZERO, R, T, RAGGED,
                                     TWO)
                acc, acc2 = _int4_fast_step(acc, acc2, b, x_ptr, k0 + BLOCK_K, nw_ptr, rstd, K, R, T, NORM, TWO,
                                            HAS_ZERO, BF16_BY_HAND)
            if STEPS % 2 == 1:
                acc, acc2 = _int4_fast_step(acc, acc2, a, x_ptr, LAST, nw_ptr, rstd, K, R, T, NORM, TWO, HAS_ZERO,
                                            BF16_BY_HAND)
        return tl.sum(tl.sum(acc, 1), 1)[None, :], tl.sum(tl.sum(acc2, 1), 1)[None, :]  # in-thread R first

    @triton.jit
    def _matmul_any(x_ptr, x_rows, row_mask, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask, nw_ptr, eps,
                    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    NORM: tl.constexpr, TWO: tl.constexpr, IEEE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                    PDL: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr,
                    FAST: tl.constexpr, GPT: tl.constexpr, WPG: tl.constexpr, SPLIT: tl.constexpr,
                    RUN: tl.constexpr):
        """The accumulators of whichever matmul the kernel was specialised for: the fast M == 1
        dequantization (FAST) or the exact path (of one part of K with SPLIT > 1)."""
        if FAST and QUANT == 2:
            return _matmul_fast_runs(x_ptr, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask, nw_ptr, eps,
                                     K, BLOCK_N, BLOCK_K, NORM, TWO, BF16_BY_HAND, PDL, GROUP, HAS_ZERO, RUN)
        elif FAST:  # int8, W8A8
            return _matmul_fast(x_ptr, w_rows, w_rows2, col_mask, nw_ptr, eps,
                                K, BLOCK_N, BLOCK_K, NORM, TWO, BF16_BY_HAND, PDL, QUANT, GPT, WPG)
        else:
            return _matmul(x_rows, row_mask, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, col_mask, nw_ptr, eps,
                           K, BLOCK_M, BLOCK_N, BLOCK_K, NORM, TWO, IEEE, BF16_BY_HAND, PDL, GROUP, QUANT, HAS_ZERO,
                           SPLIT)

    @triton.jit
    def _w_rows(w_ptr, s_ptr, z_ptr, cols, K: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr,
                FAST: tl.constexpr):
        """Row pointers [BLOCK_N, 1] of W's codes (FAST: int32 words of 8 int4 / 4 int8 codes), its
        group scales and zero points for columns cols."""
        c = cols.to(tl.int64)[:, None]
        if QUANT == 2 and FAST:
            return w_ptr + c * (K // 8), s_ptr + c * (K // GROUP), z_ptr + c * (K // GROUP)
        elif QUANT == 2:
            return w_ptr + c * (K // 2), s_ptr + c * (K // GROUP), z_ptr + c * (K // GROUP)
        elif FAST:
            return w_ptr + c * (K // 4), s_ptr + c, z_ptr + c
        else:
            return w_ptr + c * K, s_ptr + c, z_ptr + c

    @triton.jit
    def _column_scale(acc, s_ptr, cols, col_mask, dtype: tl.constexpr, QUANT: tl.constexpr,
                      BF16_BY_HAND: tl.constexpr, FAST: tl.constexpr):
        """int8 (QUANT 1): the sums of codes, rounded as a matmul writes them, times the column
        scales, rounded again (kernels/quant.py's int8_linear_ref); FAST: fp32 sums times the fp32
        scales (int8_linear_fast_ref); otherwise acc unchanged."""
        if QUANT == 1 and FAST:
            return acc * tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        elif QUANT == 1:
            scale = _rnd(tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32), dtype, BF16_BY_HAND)
            return _rnd(_rnd(acc, dtype, BF16_BY_HAND) * scale[None, :], dtype, BF16_BY_HAND)
        elif QUANT == 3:  # W8A8: fp32 throughout, one rounding after (kernels/quant.py's w8a8_linear_ref)
            return acc * tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            return acc

    @triton.jit
    def _split_k_sum(acc, acc2, ws_ptr, count_ptr, rows, cols, mask, M, N: tl.constexpr, SPLIT: tl.constexpr,
                     TWO: tl.constexpr):
        """Split-K: this program's partial sums (acc, and acc2 with TWO) into the workspace
        [SPLIT, M, 2 N] fp32, then its tile's arrival count (count_ptr: one int32 a (column, row)
        tile, zero between launches) raised by one. The last program of a tile to arrive gets the
        SPLIT partials summed in their fixed order (the same result whichever program is last) and
        True; every other gets zeros and False (its epilogue stores nothing). The last one sets
        the count back to zero for the next launch."""
        ws = ws_ptr + (tl.program_id(2) * M + rows.to(tl.int64))[:, None] * (2 * N) + cols[None, :]
        tl.store(ws, acc, mask=mask)
        if TWO:
            tl.store(ws + N, acc2, mask=mask)
        tl.debug_barrier()  # every thread's partials stored before the release below
        count = count_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
        last = (tl.zeros(mask.shape, tl.int32) + arrived) == SPLIT - 1  # as a tile (a scalar mask: not interpretable)
        acc = tl.zeros_like(acc)
        acc2 = tl.zeros_like(acc2)
        first = ws_ptr + rows.to(tl.int64)[:, None] * (2 * N) + cols[None, :]
        for part in tl.static_range(SPLIT):  # past L1: other SMs wrote them
            acc += tl.load(first + part * M * (2 * N), mask=mask & last, other=0.0, cache_modifier=".cg")
            if TWO:
                acc2 += tl.load(first + part * M * (2 * N) + N, mask=mask & last, other=0.0, cache_modifier=".cg")
        tl.atomic_add(count, -SPLIT * (arrived == SPLIT - 1).to(tl.int32), sem="relaxed", scope="gpu")
        return acc, acc2, last

    @triton.jit
    def _epilogue(acc, acc_up, rows, cols, col_mask, out_mask, b_ptr, res_ptr, out_ptr, res_stride, out_stride, N,
                  dtype: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                  BF16_BY_HAND: tl.constexpr):
        """gemv's fused epilogue on fp32 sums [BLOCK_M, BLOCK_N] (acc_up: SwiGLU's up columns, N
        after the gate's in b_ptr): bias, the matmul's rounding, SwiGLU, residual add, the store.
        dtype: x's, whose values the unfused modules would write. Also the 2:4 GEMV's (kernels/quant_gemv.py)."""
        if HAS_BIAS:  # added in fp32 before rounding, as cuBLAS's bias epilogue does
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc_up += tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        y = _rnd(acc, dtype, BF16_BY_HAND)  # the matmul's output, rounded as a separate GEMM writes it
        if SWIGLU:  # as kernels/activation.py: silu in fp32 rounded to the dtype, times up
            act = _rnd(y / (1.0 + tl.exp(-y)), dtype, BF16_BY_HAND)
            y = _rnd(act * _rnd(acc_up, dtype, BF16_BY_HAND), dtype, BF16_BY_HAND)
        if RESIDUAL:
            res = tl.load(res_ptr + rows.to(tl.int64)[:, None] * res_stride + cols[None, :], mask=out_mask, other=0.0)
            y = _rnd(y + res.to(tl.float32), dtype, BF16_BY_HAND)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=out_mask)

    # M is not specialized (Triton makes M == 1 a constant, M % 16 == 0 a divisibility hint): one
    # compiled kernel for every row count, which batch invariance rests on.
    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
        M, eps, x_stride, res_stride, out_stride,
        N: tl.constexpr, K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
        IEEE: tl.constexpr, BF16_BY_HAND: tl.constexpr, PDL: tl.constexpr,
        GROUP: tl.constexpr = 1, QUANT: tl.constexpr = 0, HAS_ZERO: tl.constexpr = False,
        FAST: tl.constexpr = False, GPT: tl.constexpr = 1, WPG: tl.constexpr = 1, SPLIT: tl.constexpr = 1,
        RUN: tl.constexpr = 4,
    ):
        # N counts output columns: with SWIGLU, W has 2N rows (gate rows, then up rows).
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # grid axis 1: 16-row tiles past SMALL_M
        row_mask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride
        w_rows, s_rows, z_rows = _w_rows(w_ptr, s_ptr, z_ptr, cols, K, GROUP, QUANT, FAST)
        w_up, s_up, z_up = _w_rows(w_ptr, s_ptr, z_ptr, cols + N, K, GROUP, QUANT, FAST)
        dtype = x_ptr.dtype.element_ty
        acc, acc_up = _matmul_any(x_ptr, x_rows, row_mask, w_rows, w_up, s_rows, s_up, z_rows, z_up, col_mask, nw_ptr,
                                  eps, K, BLOCK_M, BLOCK_N, BLOCK_K, NORM, SWIGLU, IEEE, BF16_BY_HAND, PDL,
                                  GROUP, QUANT, HAS_ZERO, FAST, GPT, WPG, SPLIT, RUN)
        out_mask = row_mask[:, None] & col_mask[None, :]
        if SPLIT > 1:  # only the last program of the tile's parts goes on, with the whole sums
            acc, acc_up, last = _split_k_sum(acc, acc_up, ws_ptr, count_ptr, rows, cols, out_mask, M, N, SPLIT,
                                             SWIGLU)
            out_mask = out_mask & last
        acc = _column_scale(acc, s_ptr, cols, col_mask, dtype, QUANT, BF16_BY_HAND, FAST)
        if SWIGLU:
            acc_up = _column_scale(acc_up, s_ptr, cols + N, col_mask, dtype, QUANT, BF16_BY_HAND, FAST)
        _epilogue(acc, acc_up, rows, cols, col_mask, out_mask, b_ptr, res_ptr, out_ptr, res_stride, out_stride, N,
                  dtype, HAS_BIAS, SWIGLU, RESIDUAL, BF16_BY_HAND)

    @triton.jit
    def _rotate(y1, y2, rows, row_mask, d, rot_mask, pos_ptr, cos_ptr, sin_ptr, cos_stride, sin_stride,
                dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """(y1, y2) rotated by the angle of each row's position, as kernels/rotary.py's kernel:
        fp32 table values (cos[d] == cos[d + HALF] in the neox tables), one rounding at the end."""
        pos = tl.load(pos_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        mask = row_mask[:, None] & rot_mask[None, :]
        cos = tl.load(cos_ptr + pos[:, None] * cos_stride + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos[:, None] * sin_stride + d[None, :], mask=mask, other=0.0).to(tl.float32)
        r1 = _rnd(y1 * cos - y2 * sin, dtype, BF16_BY_HAND)
        r2 = _rnd(y2 * cos + y1 * sin, dtype, BF16_BY_HAND)
        return r1, r2

    @triton.jit
    def _store_kv(r1, r2, rows, row_mask, kv_head, d, kv_mask, is_v, slot_ptr, k_cache_ptr, v_cache_ptr,
                  KV_HEADS: tl.constexpr, HALF: tl.constexpr):
        """Pairs of k (kv_head in [0, KV_HEADS)) and v (kv_head - KV_HEADS) columns into the cache
        [blocks, block_size, KV_HEADS, 2 * HALF] at each row's slot; slot < 0 (padding) stores nothing."""
        slot = tl.load(slot_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        kv_head = tl.where(is_v, kv_head - KV_HEADS, kv_head)
        off = slot[:, None] * (KV_HEADS * 2 * HALF) + (kv_head * (2 * HALF) + d)[None, :]
        keep = (row_mask & (slot >= 0))[:, None]
        k_mask = keep & (kv_mask & ~is_v)[None, :]
        v_mask = keep & (kv_mask & is_v)[None, :]
        tl.store(k_cache_ptr + off, r1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(k_cache_ptr + off + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(v_cache_ptr + off, r1.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
        tl.store(v_cache_ptr + off + HALF, r2.to(v_cache_ptr.dtype.element_ty), mask=v_mask)

    @triton.jit
    def _rope_pairs(BLOCK_N: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr):
        """This program's rotary pairs (grid axis 0): their mask, head, dim d < HALF in the head,
        and first qkv column (the second is col + HALF)."""
        j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_mask = j < (Q_HEADS + 2 * KV_HEADS) * HALF
        head = j // HALF
        d = j % HALF
        col = head * (2 * HALF) + d  # first member of the pair; the second is col + HALF
        return j_mask, head, d, col

    @triton.jit
    def _rope_store_epilogue(acc1, acc2, rows, row_mask, j_mask, head, d, col, b_ptr, q_ptr, q_stride, pos_ptr,
                             cos_ptr, sin_ptr, cos_stride, sin_stride, slot_ptr, k_cache_ptr, v_cache_ptr,
                             dtype: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """gemv_rope_store's epilogue on the fp32 sums of the pairs' columns col (acc1) and col + HALF
        (acc2): bias, the qkv rounding, q and k rotated, q stored, k and v into the cache. Also the
        2:4 GEMV's (kernels/quant_gemv.py)."""
        if HAS_BIAS:  # before the rotation (Qwen2), in fp32 before rounding as gemv does
            acc1 += tl.load(b_ptr + col, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            acc2 += tl.load(b_ptr + col + HALF, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        # The qkv values the unfused gemv would have written, then rope_store's arithmetic on them.
        y1 = _rnd(acc1, dtype, BF16_BY_HAND)
        y2 = _rnd(acc2, dtype, BF16_BY_HAND)
        is_q = head < Q_HEADS
        is_v = head >= Q_HEADS + KV_HEADS
        r1, r2 = _rotate(y1, y2, rows, row_mask, d, j_mask & ~is_v, pos_ptr, cos_ptr, sin_ptr,
                         cos_stride, sin_stride, dtype, BF16_BY_HAND)
        r1 = tl.where(is_v[None, :], y1, r1)
        r2 = tl.where(is_v[None, :], y2, r2)

        q_mask = row_mask[:, None] & (j_mask & is_q)[None, :]
        q_out = q_ptr + rows.to(tl.int64)[:, None] * q_stride + col[None, :]
        tl.store(q_out, r1.to(q_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_out + HALF, r2.to(q_ptr.dtype.element_ty), mask=q_mask)
        _store_kv(r1, r2, rows, row_mask, head - Q_HEADS, d, j_mask & ~is_q, is_v, slot_ptr,
                  k_cache_ptr, v_cache_ptr, KV_HEADS, HALF)

    # M is not specialized (Triton makes M == 1 a constant, M % 16 == 0 a divisibility hint): one
    # compiled kernel for every row count, which batch invariance rests on.
    @triton.jit(do_not_specialize=["M"])
    def _gemv_rope_store_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, q_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        slot_ptr, M, eps, x_stride, q_stride, cos_stride, sin_stride,
        K: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
        PDL: tl.constexpr, GROUP: tl.constexpr = 1, QUANT: tl.constexpr = 0, HAS_ZERO: tl.constexpr = False,
        FAST: tl.constexpr = False, GPT: tl.constexpr = 1, WPG: tl.constexpr = 1, RUN: tl.constexpr = 4,
    ):
        # Programs count rotary pairs, not columns: pair j is dim d = j % HALF of head j // HALF in
        # the qkv output (q heads, then k heads, then v heads), i.e. columns c and c + HALF. v's
        # pairs are not rotated; splitting them the same way keeps one code path.
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # grid axis 1: 16-row tiles past SMALL_M
        row_mask = rows < M
        j_mask, head, d, col = _rope_pairs(BLOCK_N, Q_HEADS, KV_HEADS, HALF)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride
        w_rows, s_rows, z_rows = _w_rows(w_ptr, s_ptr, z_ptr, col, K, GROUP, QUANT, FAST)
        w_rows2, s_rows2, z_rows2 = _w_rows(w_ptr, s_ptr, z_ptr, col + HALF, K, GROUP, QUANT, FAST)
        dtype = x_ptr.dtype.element_ty
        acc1, acc2 = _matmul_any(x_ptr, x_rows, row_mask, w_rows, w_rows2, s_rows, s_rows2, z_rows, z_rows2, j_mask,
                                 nw_ptr, eps, K, BLOCK_M, BLOCK_N, BLOCK_K, NORM, True, IEEE, BF16_BY_HAND, PDL,
                                 GROUP, QUANT, HAS_ZERO, FAST, GPT, WPG, 1, RUN)
        acc1 = _column_scale(acc1, s_ptr, col, j_mask, dtype, QUANT, BF16_BY_HAND, FAST)
        acc2 = _column_scale(acc2, s_ptr, col + HALF, j_mask, dtype, QUANT, BF16_BY_HAND, FAST)
        _rope_store_epilogue(acc1, acc2, rows, row_mask, j_mask, head, d, col, b_ptr, q_ptr, q_stride, pos_ptr,
                             cos_ptr, sin_ptr, cos_stride, sin_stride, slot_ptr, k_cache_ptr, v_cache_ptr, dtype,
                             Q_HEADS, KV_HEADS, HALF, HAS_BIAS, BF16_BY_HAND)


QUANT_KINDS = {"dense": 0, "int8": 1, "int4": 2, "w8a8_int8": 3}


def _quant_args(weight: torch.Tensor, k: int, quant: str, scale: torch.Tensor | None,
                zero: torch.Tensor | None) -> tuple[int, dict]:
    """W's input width and the kernel arguments of its format (kernels/quant.py's layouts):
    dense; int8 codes [N, K] with scale [N]; int4 packed [N, K / 2] with scale, zero [N, K / G].
    args["w_ptr"]: the weight the kernel reads."""
    kind = QUANT_KINDS[quant]
    args = {"w_ptr": weight, "s_ptr": weight, "z_ptr": weight, "GROUP": 1, "QUANT": kind, "HAS_ZERO": False}
    if kind == 0:
        return weight.shape[1], args
    assert scale is not None and scale.is_contiguous()
    args["s_ptr"] = scale
    if kind in (1, 3):
        assert weight.dtype == torch.int8 and scale.numel() == weight.shape[0]
        return weight.shape[1], args
    assert weight.dtype == torch.uint8 and scale.shape[0] == weight.shape[0] and k % scale.shape[1] == 0
    group = k // scale.shape[1]
    assert group % 2 == 0
    if zero is not None:
        assert zero.shape == scale.shape and zero.is_contiguous()
        args.update(z_ptr=zero, HAS_ZERO=True)
    args["GROUP"] = group
    return 2 * weight.shape[1], args


def _launch_config(m: int, n: int, k: int, quant: str, qargs: dict, fast: bool, two: bool,
                   config: tuple[int, int, int, int] | None,
                   default) -> tuple[tuple[int, int, int, int], dict]:
    """The launch config (``config``, else the fast path's or ``default``) and the kernel
    arguments: with ``fast`` at M == 1 on a compressed weight, the codes as int32 words and the
    fast path's constexprs (FAST, GPT, WPG). At M > 1 ``fast`` changes nothing: every format takes
    the exact path (module docstring)."""
    group = qargs["GROUP"]
    if not (fast and m == 1 and quant != "dense"):
        return config or default(), qargs
    if not fast_dequant_fits(quant, k, group):
        raise ValueError(f"fast dequantization: {quant} with K {k} and group {group} does not fit whole int32 "
                         f"words (K a multiple of {WORD_CODES[quant]}, int4 groups a power of two >= 8)")
    config = config or fast_gemv_config(n, k, quant, group, two)
    assert config[0] == 1, config
    gpt, wpg = _fast_words(quant, group, config[2])
    w = qargs["w_ptr"]
    run = {"RUN": FAST_INT4_RUN} if quant == "int4" else {}
    return config, {**qargs, "w_ptr": w.view(torch.int32), "FAST": True, "GPT": gpt, "WPG": wpg, **run}


class SplitKWorkspace:
    """Split-K's workspaces per device (gemv's split_k and kernels/int4_mma.py share them): fp32
    partial sums and the tiles' int32 arrival counts, grown on demand; every launch leaves the counts
    at zero. Launches that share them must not overlap: one stream, as the engine's decode (PDL lets
    the next kernel start, but it waits for this one before its own split-K stores). Allocate (call
    once with the largest shapes) before a CUDA-graph capture."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, count = self._bufs.get(device, (None, None))
        if part is None or part.numel() < partials or count.numel() < counters:
            assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
                "split-K workspace first allocated inside a CUDA graph capture (run the shape once before)"
            part = torch.empty(max(partials, 0 if part is None else part.numel()), dtype=torch.float32, device=device)
            count = torch.zeros(max(counters, 0 if count is None else count.numel()), dtype=torch.int32,
                                device=device)
            self._bufs[device] = (part, count)
        return part, count


SPLIT_K_WORKSPACE = SplitKWorkspace()


def _elem_bytes(weight: torch.Tensor, k: int) -> float:
    """Bytes a weight element of W [N, K] (int4 packs two in a byte)."""
    return weight.shape[1] * weight.element_size() / k


def _check_invariant(batch_invariant: bool, fast: bool, config: tuple[int, int, int, int] | None) -> None:
    if batch_invariant and fast:
        raise ValueError("gemv: batch_invariant with fast dequantization "
                         "(its M == 1 and M > 1 paths reduce differently)")
    if batch_invariant and config is not None and config[0] != SMALL_M:
        raise ValueError(f"gemv: batch_invariant needs {SMALL_M}-row tiles at every M, config {config}")


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    residual: torch.Tensor | None = None, swiglu: bool = False, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None, pdl: bool = True,
    quant: str = "dense", scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    fast: bool = False, batch_invariant: bool = False, split_k: int = 1,
) -> torch.Tensor:
    """Triton version of gemv_ref for x [M <= SMALL_M, K] (any M with ``batch_invariant``: each row's
    output the same at every M, the module docstring's batch invariance; not with ``fast``). ``out``
    may be ``residual`` itself (an in-place add into the residual stream: each program reads and
    writes only its own columns), but not ``x`` when the norm prologue reads whole rows of it. ``config`` overrides gemv_config.
    ``pdl``: programmatic dependent launch wherever the GPU has it (kernels/_triton.py).
    ``quant``: W's format, "dense", "int8", "int4" or "w8a8_int8" (with ``scale``, ``zero``:
    _quant_args); the reference is then gemv_ref on the dequantized weight (kernels/quant.py),
    for W8A8 on the per-token quantized input. ``fast``: at M == 1 the fast dequantization (module
    docstring; fast_gemv_config), whose reference is gemv_ref on the fp32 dequantized weight.
    ``split_k`` > 1 (the exact path; not the fast M == 1 one nor batch-invariant mode): each
    (column, row) tile's K in that many programs, the last to finish summing their partials in a
    fixed order and running the epilogue (_split_k_sum): more programs where N / BLOCK_N leaves
    SMs idle (N 4096 at M > 1: 128 programs of 32 columns).
    Formats these kernels do not read (2:4 + int4) go through kernels/decode_gemv.py."""
    m, k = x.shape
    rows_w = weight.shape[0]
    kw, qargs = _quant_args(weight, k, quant, scale, zero)
    n = rows_w // 2 if swiglu else rows_w
    _check_invariant(batch_invariant, fast, config)
    if split_k < 1 or (split_k > 1 and (batch_invariant or (fast and m == 1 and quant != "dense"))):
        raise ValueError(f"gemv: split_k {split_k} (a positive count, and 1 with batch_invariant or on the fast "
                         "M == 1 path)")
    assert k == kw and (m <= SMALL_M or batch_invariant) and weight.is_contiguous(), (x.shape, weight.shape)
    assert not (swiglu and rows_w % 2)
    assert norm_weight is None or k <= MAX_NORM_K
    if x.stride(1) != 1:
        x = x.contiguous()
    x, norm_weight = _norm_apart(x, weight, norm_weight, eps, batch_invariant)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    assert norm_weight is None or out.data_ptr() != x.data_ptr(), "the norm prologue reads rows out would overwrite"
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    if m == 0:
        return out
    launch = pdl_launch_args(pdl and not large_rows(m, weight), x.device)  # large_rows: no PDL
    (block_m, block_n, block_k, num_warps), qargs = _launch_config(
        m, n, k, quant, qargs, fast, swiglu, config,
        lambda: (batch_invariant_config(n, k) if batch_invariant
                 else gemv_config(m, n, k, two=swiglu, pdl=launch["PDL"], elem_bytes=_elem_bytes(weight, k))))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    ws, count = SPLIT_K_WORKSPACE.get(x.device, split_k * m * 2 * n, grid[0] * grid[1]) if split_k > 1 else (out, out)
    _gemv_kernel[grid](
        x, qargs.pop("w_ptr"), qargs.pop("s_ptr"), qargs.pop("z_ptr"),
        bias if bias is not None else weight,  # unused pointers: any tensor
        norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out,
        out, ws, count,
        m, eps, x.stride(0), (residual if residual is not None else out).stride(0), out.stride(0),
        N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, RESIDUAL=residual is not None, SWIGLU=swiglu,
        # The interpreter's tl.dot gets 16-bit floats wrong (it multiplies their raw bits): there
        # take the fp32 dot, which gives the same result (products of 16-bit floats are exact in fp32).
        IEEE=x.dtype == torch.float32 or interpreting(),
        BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16,
        **launch, **qargs, SPLIT=split_k,
        num_warps=num_warps,
    )
    return out


def gemv_rope_store_config(m: int, n: int, k: int, pdl: bool = True,
                           elem_bytes: float = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_PAIRS, BLOCK_K, num_warps): gemv_config's, with each program computing as
    many columns as the plain gemv's (half as many pairs, two W tiles of them), so M == 1 keeps its
    program count.
    tl.dot (M > 1) needs 16 pairs at least: there a program computes 32 columns; on large weights as many
    pairs as gemv's columns (64 columns: Llama-2-7B's qkv at 16 rows 31.6 us against 44.8 with 32 columns
    after a norm launch, 39.0 against 65.2 with the norm prologue, H200, gemv_config's sweep)."""
    block_m, block_n, block_k, num_warps = gemv_config(m, n, k, pdl=pdl, elem_bytes=elem_bytes)
    if block_m > 1 and n * k * elem_bytes >= LATENCY_BYTES and elem_bytes >= 1:  # int4 unmeasured: as before
        return block_m, block_n, block_k, num_warps
    if block_m > 1 and _small_rows_tile(n, k, elem_bytes):  # 32 pairs: SmolLM2's qkv + rope 5.0-5.1 us at 2-16 rows
        return block_m, 32, block_k, num_warps           # against 5.4-5.7 (16 pairs, 256) and 9.4 (16, 1024)
    return block_m, max(16 if block_m > 1 else 1, block_n // 2), block_k, num_warps


def gemv_rope_store(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None, pdl: bool = True,
    quant: str = "dense", scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    fast: bool = False, batch_invariant: bool = False,
) -> torch.Tensor:
    """Triton version of gemv_rope_store_ref: the fused qkv projection ([q; k; v] rows of weight)
    of x [M <= SMALL_M, K] with norm prologue and bias, q and k rotated at ``positions`` (neox,
    fp32 tables [max_pos, head_dim]), k and v written into the caches [blocks, block_size,
    num_kv_heads, head_dim] at ``slot_mapping`` (< 0: nothing). Returns q [M, num_heads * head_dim]
    (into ``out`` if given). One launch replaces gemv + rope_store; the rotated k and v exist only
    in the cache. ``config`` overrides gemv_rope_store_config; ``quant``, ``scale``, ``zero``, ``fast``,
    ``batch_invariant`` (any M) as gemv's."""
    m, k = x.shape
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    n = (num_heads + 2 * num_kv_heads) * head_dim
    kw, qargs = _quant_args(weight, k, quant, scale, zero)
    assert head_dim % 2 == 0 and weight.shape[0] == n and kw == k and weight.is_contiguous(), (weight.shape, n, k)
    _check_invariant(batch_invariant, fast, config)
    assert (m <= SMALL_M or batch_invariant) and (norm_weight is None or k <= MAX_NORM_K)
    assert k_cache.shape[-2] == num_kv_heads and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape
    assert cos_table.shape[-1] == head_dim and cos_table.stride(1) == 1 and sin_table.stride(1) == 1
    assert positions.shape == (m,) and slot_mapping.shape[0] >= m
    if x.stride(1) != 1:
        x = x.contiguous()
    x, norm_weight = _norm_apart(x, weight, norm_weight, eps, batch_invariant)
    if out is None:
        out = torch.empty(m, num_heads * head_dim, dtype=x.dtype, device=x.device)
    assert out.shape == (m, num_heads * head_dim) and out.stride(1) == 1
    if m == 0:
        return out
    launch = pdl_launch_args(pdl and not large_rows(m, weight), x.device)  # large_rows: no PDL
    (block_m, block_pairs, block_k, num_warps), qargs = _launch_config(
        m, n // 2, k, quant, qargs, fast, True, config,
        lambda: gemv_rope_store_config(SMALL_M if batch_invariant else m, n, k, pdl=launch["PDL"],
                                       elem_bytes=_elem_bytes(weight, k)))
    _gemv_rope_store_kernel[(triton.cdiv(n // 2, block_pairs), triton.cdiv(m, block_m))](
        x, qargs.pop("w_ptr"), qargs.pop("s_ptr"), qargs.pop("z_ptr"), bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        out, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        m, eps, x.stride(0), out.stride(0), cos_table.stride(0), sin_table.stride(0),
        K=k, Q_HEADS=num_heads, KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_M=block_m, BLOCK_N=block_pairs, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, NORM=norm_weight is not None,
        IEEE=x.dtype == torch.float32 or interpreting(),  # as in gemv
        BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16,
        **launch, **qargs,
        num_warps=num_warps,
    )
    return out
