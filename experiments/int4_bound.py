"""What binds issue 13's int4 M == 1 GEMV (kernels/gemv.py's _matmul_fast_runs): a ladder of kernels that
walk the int4 weight exactly as the fast path does (its tile and 128-bit runs of code words,
_int4_fast_tile; its grid and fast_gemv_config's (BLOCK_N, BLOCK_K, num_warps)) and do
progressively more of its work, timed like experiments/quant_gemv_sweep.py (CUDA graphs over weight
copies larger than L2, the same copy ceiling):
- "f_empty": the same grid loading nothing (a store a program): the launch's and the graph's floor;
- "a_codes": the code words only, folded into one int32 per program (a wrapping sum, stored, so the
  compiler cannot drop the loads; the unused scale loads of _int4_fast_tile are dead and dropped);
- "b_scales": + the group scales (and zero points), their fp32 bits folded in;
- "c_x": + the x loads and split (_int4_fast_x), the sum of each word's 8 inputs folded in the
  words' layout (one layout conversion a step where the real kernel converts 9 operands);
- "d_real": the real GEMV, gemv(fast=True) at the same config without PDL (as the ladder's
  kernels), and "d_real_pdl" with PDL (as the engine launches it);
- "e_*": the load-only walk (a) changed to raise the bytes in flight: UNROLL steps loaded before
  their folds (the fast path keeps 2 in flight: FAST_UNROLL), more rows per program, split-K
  (SPLIT programs per column range, each its own part of K), wider K steps;
- "g_*": size-matched ceilings (G_VARIANTS): a copy and a plain streaming read of the same bytes, one
  launch a weight copy in the same graph, so a ladder row can be held to what its byte count allows;
- "t_*": the codes in a tile-major layout (tile_int4, repacked once at load time: each program's
  BLOCK_N x BLOCK_K tile of code words one contiguous chunk, the scales and zero points tiled alike):
  "t_codes" the codes-only walk on it, "t_gemv" a full M == 1 GEMV on it (x, scales, zero points,
  the fast path's dequantization in registers, fp32 sums, split-K) at every TILED_CONFIGS entry, each
  checked against the torch reference before it is timed, "t_gemv_pdl" a shape's best with PDL.
Shapes: Llama-2-7B's four decode linears as plain N x K matmuls (gate_up's 22016 rows as one set,
no SwiGLU pairing), int4 g128. One JSON line each: us, GB/s of the weight bytes (codes + scales,
as the sweep counts them) and of the bytes the variant reads, the fraction of the copy ceiling,
the programs and the code bytes a program has in flight.

    python experiments/int4_bound.py --json int4_bound.jsonl [--shapes qkv down] [--variants a_codes e_split4]
    python experiments/int4_bound.py --sass [--shapes ...]   # no GPU: sm_90 loads, registers, programs an SM

The tile-major test on the GPU (one H200 call, under about 2 minutes on a cold Triton cache, most of it
compiling: --budget-s cuts the t_* rows still to come past 90 s; the zero-point format runs only the
--tiled-top 3 configs fastest in total in the symmetric rows):

    python experiments/int4_bound.py --variants a_codes d_real d_real_pdl g_read t_codes t_gemv t_gemv_pdl \
        --formats int4_g128 int4_g128_zero --budget-s 90 --json int4_tiled.jsonl

It prints per shape and format a "tiled_summary" line: us of g_read, a_codes (the fast path's codes-only
walk), d_real, d_real_pdl, the best t_codes and t_gemv (and t_gemv_pdl), each also as g_read's time over
its own ("_of_g_read": 1.0 is a plain read of the codes' bytes), and t_gemv's speedup over d_real_pdl.
Hypothesis (a): t_codes near g_read (1.0) where a_codes was at 0.65-0.74 of it; (b): t_gemv well above
d_real's 0.40-0.43 of it (0.60 at o_proj). Each t_* row counts its bytes: code_bytes, scale_bytes (with
zero points), x_bytes (once from DRAM) and x_bytes_requested (every column block's, mostly L2), split_bytes
(split-K's fp32 partials, written and read), out_bytes; its GB/s is of read_bytes, its fraction of the
copy ceiling of the weight's bytes (as the ladder's). "check_ok": the fp32 result within 1e-5 (relative
norm) of x times the fp32 dequantized weight, the codes-only folds exactly torch's.

Reading it (hypotheses of issue 13's "not instruction bound" result, BENCHMARKS.md's last section;
"ideal_us": the weight bytes at the copy ceiling). f_empty near d_real: the launch and the tail, not
the bytes (int4's o_proj is 8.4 MB, 2 us at 4.2 TB/s, so a fixed ~2-3 us a launch alone caps it near
the measured 30-42%; bf16's 4x larger weights hide it). a_codes near d_real (and well above f_empty):
the walk binds (bytes in flight, programs), not the scales, x or math; then the e_* row that lifts
a_codes most names the fix (e_unroll*: steps in flight per program; e_rows*: bytes per load step;
e_split*: programs per SM). a_codes near bf16's 75-97% with the drop at b_scales: the dependent scale
loads; at c_x: x's loads and shuffle; at d_real: the dequantization, registers (160 at down: 3
programs an SM, --sass) and the final reduction. --sass (no GPU) gives each variant's loads,
registers and programs an SM: where the compiler unrolled a load-only loop whole ("counted":
"kernel"; a_codes at down: all 6 steps' loads issued at once, more than the real loop's 2), the
load-only rows bound the walk from above rather than mirror it.

Counted (--sass, sm_90, this branch; registers -> programs an SM holds, capped by the grid): the
real kernel holds 102 registers at K 4096 (4 programs of 4 warps an SM: qkv's 1536 programs take 3
waves, gate_up's 2752 six, o_proj's 512 one) and 160 at down (3 an SM: 512 programs need 4, so 396
run, then a tail wave of 116); c_x 56 / 121, b_scales 40 / 72, a_codes 32 / 68 (16 an SM by the
warp limit). At o_proj every program is resident at once and has its whole 16 KB of codes requested
before its first use (64 KB an SM, twice Little's ~32 KB): if o_proj stays far from the ceiling,
bytes in flight are not what binds it. The load-only loop at down is unrolled whole by the compiler
(24 128-bit loads a thread, all 6 steps); e_split4 halves its registers (32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from eval.bench.common import graph_seconds
from experiments.quant_gemv_sweep import COPY_BYTES, SHAPES, Records, copy_ceiling_tbps, make_weights
from kernels import quant as ref
from kernels._triton import HAS_TRITON, interpreting, next_pow2, pdl_launch_args
from kernels.gemv import FAST_UNROLL, SPLIT_K_WORKSPACE, _fast_words, fast_gemv_config, gemv

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.gemv import _int4_fast_mac, _int4_fast_tile, _int4_fast_x, _rnd, _w_rows

STEPS_IN_FLIGHT = int(FAST_UNROLL)  # the fast path's (a plain int: the JSON lines carry it)
LEVELS = {"f_empty": -1, "a_codes": 0, "b_scales": 1, "c_x": 2}
SMS = 132  # an H200's SMs (programs per SM in the JSON)
# e_* variants of the load-only walk: name -> (entry change, UNROLL, SPLIT); entry change: (BLOCK_N
# factor, BLOCK_K or None for the heuristic's, num_warps or None).
E_VARIANTS = {
    "e_unroll4": ((1, None, None), 4, 1), "e_unroll8": ((1, None, None), 8, 1),
    "e_k1024_unroll8": ((1, 1024, None), 8, 1),
    "e_rows2": ((2, None, None), STEPS_IN_FLIGHT, 1), "e_rows4": ((4, None, None), STEPS_IN_FLIGHT, 1),
    "e_split2": ((1, None, None), STEPS_IN_FLIGHT, 2), "e_split4": ((1, None, None), STEPS_IN_FLIGHT, 4),
    "e_k4096": ((1, 4096, None), STEPS_IN_FLIGHT, 1), "e_warps8": ((1, None, 8), STEPS_IN_FLIGHT, 1),
    "e_rows2_split2": ((2, None, None), STEPS_IN_FLIGHT, 2),
}
VARIANTS = list(LEVELS) + ["d_real", "d_real_pdl"] + list(E_VARIANTS)
# Size-matched ceilings, the same graph of one launch a weight copy: what a kernel moving this many bytes can reach
# at all. The copy ceiling is a 1 GiB copy; a 7B linear's int4 codes are 8-45 MB, a few microseconds at the
# ceiling, where a launch's ramp-up and tail weigh. Their fraction is read_of_copy_ceiling (bytes moved):
# "g_copy": torch's copy of half the code bytes (read + write = the codes' bytes); "g_copy_bf16": of the bf16
# weight's bytes (what the bf16 GEMV's 75-97% is measured on); "g_read": a streaming read of the codes, flat,
# 16 KB a program; "g_read_persist": the same read by 4 programs an SM, each striding over the blocks.
G_VARIANTS = ["g_copy", "g_copy_bf16", "g_read", "g_read_persist"]
STREAM_BLOCK = 4096  # int32 words (16 KB) a program reads a step in g_read*
FORMAT = "int4_g128"
DEVICE = "cuda"  # a CPU smoke test of main's flow sets "cpu" (tests/kernels/test_int4_bound.py)

if HAS_TRITON:

    @triton.jit
    def _int4_bound_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, LEVEL: tl.constexpr,
                           UNROLL: tl.constexpr, SPLIT: tl.constexpr, N, BF16_BY_HAND: tl.constexpr):
        """out[pid0, pid1]: the wrapping int32 sum of what program (pid0, pid1) read (fold_ref): its
        code words; with LEVEL >= 1 each word's group scale (and zero) bits; with LEVEL >= 2 the
        bits of each word's input sum, once per column. Program pid1 of SPLIT walks its share of
        the K steps, UNROLL steps loaded before they are folded."""
        R: tl.constexpr = 4 if BLOCK_K >= 32 else BLOCK_K // 8  # as _matmul_fast_runs had it before 8-word runs
        T: tl.constexpr = BLOCK_K // (8 * R)
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        PER: tl.constexpr = (STEPS + SPLIT - 1) // SPLIT
        RAGGED: tl.constexpr = K % BLOCK_K != 0
        SREP: tl.constexpr = R if (GROUP // 8) % R == 0 else 1  # words a scale element stands for
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w_rows, s_rows, z_rows = _w_rows(w_ptr, s_ptr, z_ptr, cols, K, GROUP, 2, True)
        first = tl.program_id(1) * PER
        last = tl.minimum(first + PER, STEPS)
        acc = tl.zeros([BLOCK_N, R, T], tl.int32)
        acc_s = tl.zeros([BLOCK_N, 1 if SREP == R else R, T], tl.int32)
        for s0 in range(first, last if LEVEL >= 0 else first, UNROLL):  # LEVEL -1: no loads, the launch alone
            for u in tl.static_range(UNROLL):
                k0 = (s0 + u) * BLOCK_K
                # the step is this program's (an UNROLL overhang is not); a tile: a scalar mask is not interpretable
                live = col_mask & ((tl.zeros([BLOCK_N], tl.int32) + s0 + u) < last)
                words, scale, zero = _int4_fast_tile(w_rows, s_rows, z_rows, k0, live, K,
                                                     GROUP, HAS_ZERO, R, T, RAGGED)
                acc += words
                if LEVEL >= 1:
                    acc_s += scale.to(tl.int32, bitcast=True)
                    if HAS_ZERO:
                        acc_s += zero.to(tl.int32, bitcast=True)
                if LEVEL >= 2:
                    xc, xw = _int4_fast_x(x_ptr, k0, x_ptr, 1.0, K, R, T, False, BF16_BY_HAND)
                    xw = tl.where((tl.zeros([R, T], tl.int32) + s0 + u) < last, xw, 0.0)
                    acc += xw.to(tl.int32, bitcast=True)[None, :, :]
        total = tl.sum(tl.sum(tl.sum(acc, 2), 1), 0) + SREP * tl.sum(tl.sum(tl.sum(acc_s, 2), 1), 0)
        tl.store(out_ptr + tl.program_id(0) * SPLIT + tl.program_id(1), total)


    @triton.jit
    def _stream_read_kernel(w_ptr, out_ptr, WORDS, PROGRAMS, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """out[pid]: the wrapping int32 sum of the blocks pid, pid + PROGRAMS, ... of the flat words."""
        acc = tl.zeros([BLOCK], tl.int32)
        for i in range(ITERS):
            offs = (tl.program_id(0) + i * PROGRAMS) * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(w_ptr + offs, mask=offs < WORDS, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def stream_read(w: torch.Tensor, programs: int | None = None, block: int = STREAM_BLOCK) -> torch.Tensor:
    """g_read (programs None: one block each) and g_read_persist (programs fixed, striding): the
    per-program wrapping int32 sums of w's bytes read as int32 words, flat."""
    words = w.reshape(-1).view(torch.int32)
    blocks = -(-words.numel() // block)
    programs = min(programs or blocks, blocks)
    out = torch.empty(programs, dtype=torch.int32, device=w.device)
    _stream_read_kernel[(programs,)](words, out, words.numel(), programs, BLOCK=block, ITERS=-(-blocks // programs),
                                     num_warps=4)
    return out


def stream_read_ref(w: torch.Tensor, programs: int | None = None, block: int = STREAM_BLOCK) -> torch.Tensor:
    """stream_read in torch."""
    words = w.reshape(-1).view(torch.int32).long().cpu()
    blocks = -(-words.numel() // block)
    programs = min(programs or blocks, blocks)
    sums = [int(words[b * block:(b + 1) * block].sum()) for b in range(blocks)]
    return torch.tensor([_wrap(sum(sums[p::programs])) for p in range(programs)], dtype=torch.int32)


def _wrap(v: int) -> int:
    """v as the int32 a wrapping sum leaves."""
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def fold(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, level: int,
         config: tuple[int, int, int, int], unroll: int = STEPS_IN_FLIGHT, split: int = 1) -> torch.Tensor:
    """The load ladder's folds [cdiv(N, BLOCK_N), split] int32 of x [1, K] against the int4 weight
    (packed [N, K / 2] uint8, scale / zero [N, K / G]: kernels/quant.py's layout) at the fast path's
    config (1, BLOCK_N, BLOCK_K, num_warps); level -1 (f_empty: zeros), 0 (a), 1 (b) or 2 (c)."""
    n, k = w.shape[0], 2 * w.shape[1]
    group = k // scale.shape[1]
    _, block_n, block_k, warps = config
    if x.shape != (1, k) or level not in (-1, 0, 1, 2) or unroll < 1 or split < 1:
        raise ValueError(f"int4_bound.fold: x {tuple(x.shape)} (want (1, {k})), level {level} (-1..2), "
                         f"unroll {unroll}, split {split} (positive)")
    _fast_words("int4", group, block_k)  # raises on a step the fast path cannot tile
    grid = (triton.cdiv(n, block_n), split)
    out = torch.empty(grid, dtype=torch.int32, device=x.device)
    _int4_bound_kernel[grid](x, w.view(torch.int32), scale, zero if zero is not None else scale, out, K=k,
                             BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, HAS_ZERO=zero is not None, LEVEL=level,
                             UNROLL=unroll, SPLIT=split, N=n,
                             BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16, num_warps=warps)
    return out


def fold_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, level: int,
             config: tuple[int, int, int, int], split: int = 1) -> torch.Tensor:
    """fold in torch: per program, the wrapping sum of its words [columns, word range of its K
    steps], + (level >= 1) WPG times its groups' scale (and zero) bits, + (level >= 2) BLOCK_N times
    the bits of each of its words' fp32 input sums ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))."""
    n, k = w.shape[0], 2 * w.shape[1]
    group = k // scale.shape[1]
    _, block_n, block_k, _ = config
    words = w.view(torch.int32).long()
    bits = [t.float().view(torch.int32).long() for t in (scale, zero) if t is not None and level >= 1]
    xf = x.float().reshape(-1, 8)
    xw = ((xf[:, 0] + xf[:, 1]) + (xf[:, 2] + xf[:, 3])) + ((xf[:, 4] + xf[:, 5]) + (xf[:, 6] + xf[:, 7]))
    xw_bits = xw.view(torch.int32).long()
    steps = -(-k // block_k)
    per = -(-steps // split)
    out = torch.empty(-(-n // block_n), split, dtype=torch.int32)
    for pn in range(out.shape[0]):
        cols = slice(pn * block_n, min(n, (pn + 1) * block_n))
        for pk in range(split):
            k_lo, k_hi = min(k, pk * per * block_k), min(k, (pk + 1) * per * block_k)
            total = int(words[cols, k_lo // 8:k_hi // 8].sum()) if level >= 0 else 0
            total += sum(int(b[cols, k_lo // group:k_hi // group].sum()) * (group // 8) for b in bits)
            if level >= 2:
                total += block_n * int(xw_bits[k_lo // 8:k_hi // 8].sum())
            out[pn, pk] = _wrap(total)
    return out.to(x.device)


def variant_config(name: str, n: int, k: int, group: int) -> tuple[tuple[int, int, int, int], int, int, int]:
    """(config, level, unroll, split) of a ladder variant at N x K: the fast path's heuristic config
    (fast_gemv_config), changed for the e_* ones (their level: 0)."""
    base = fast_gemv_config(n, k, "int4", group)
    if name in LEVELS or name.startswith("d_real"):
        return base, LEVELS.get(name, 3), STEPS_IN_FLIGHT, 1
    (rows, block_k, warps), unroll, split = E_VARIANTS[name]
    block_k = max(group, min(block_k or base[2], next_pow2(k)))  # as fast_gemv_config bounds it
    return (1, base[1] * rows, block_k, warps or base[3]), 0, unroll, split


def read_bytes(level: int, n: int, k: int, group: int, zero: bool, x_bytes: int) -> int:
    """Bytes a level reads from memory once (the codes; + scales, zeros; + x)."""
    nbytes = n * k // 2 if level >= 0 else 0
    if level >= 1:
        nbytes += n * (k // group) * 4 * (2 if zero else 1)
    if level >= 2:
        nbytes += x_bytes
    return nbytes


def compile_sm90(name: str, n: int, k: int, group: int = 128) -> tuple[bytes, tuple]:
    """The cubin of a ladder variant at N x K for sm_90 (Triton's bundled ptxas, no GPU) and its
    config; d_real* is the fast path's _gemv_kernel (experiments/gemv_sass_count.py's compile)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from experiments import gemv_sass_count

    cfg, level, unroll, split = variant_config(name, n, k, group)
    if level == 3:
        return gemv_sass_count.compile_sm90("int4", True, group, False, 1, n, k)
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*i32", "N": "i32"}
    constexprs = dict(K=k, BLOCK_N=cfg[1], BLOCK_K=cfg[2], GROUP=group, HAS_ZERO=False, LEVEL=level, UNROLL=unroll,
                      SPLIT=split, BF16_BY_HAND=False)
    sig.update({key: "constexpr" for key in constexprs})
    aligned = [key for key, ty in sig.items() if ty.startswith("*") or (key == "N" and n % 16 == 0)]  # as a launch
    attrs = {(_int4_bound_kernel.arg_names.index(key),): [["tt.divisibility", 16]] for key in aligned}
    kernel = triton.compile(ASTSource(_int4_bound_kernel, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg[3]})
    return kernel.asm["cubin"], cfg


def sass_stats(name: str, n: int, k: int, group: int = 128) -> dict:
    """A variant's sm_90 global loads (by width; bytes a thread loads in the K loop's body, or the
    whole kernel where the loop is unrolled), registers, spills, the programs an SM holds and the
    code bytes they have requested per loop pass (gemv_sass_count's counters): what the timings'
    bytes in flight are predicted from."""
    import subprocess
    import tempfile

    from experiments.gemv_sass_count import BIN, load_stats, loop_body, programs_per_sm, resources

    cubin, cfg = compile_sm90(name, n, k, group)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        regs, spill = resources(f.name)
    body, looped = loop_body(sass)
    loads = load_stats(body)
    split = variant_config(name, n, k, group)[3]
    resident = programs_per_sm(regs, cfg[3], -(-n // cfg[1]) * split)
    return {"kind": "sass", "variant": name, "N": n, "K": k, "config": list(cfg),
            "counted": "loop" if looped else "kernel",
            "ldg": loads["ldg"], "ldg_bytes_per_thread": loads["ldg_bytes"], "regs": regs, "spill_bytes": spill,
            "programs_per_sm": resident, "ldg_bytes_per_sm": resident * cfg[3] * 32 * loads["ldg_bytes"]}


def measure(name: str, shape: str, weights: list, nbytes: int, x: torch.Tensor, ceiling: float,
            fmt: str = FORMAT) -> dict:
    """One variant's JSON record at a shape: config, programs, bytes, and its time per launch over all
    weight copies in one CUDA graph (graph_seconds), or the error a config met."""
    n, k, _ = SHAPES[shape]
    if name in G_VARIANTS:
        return measure_ceiling(name, shape, weights, nbytes, ceiling, fmt)
    cfg, level, unroll, split = variant_config(name, n, k, 128)
    programs = -(-n // cfg[1]) * split
    rec: dict[str, Any] = {"kind": "measure", "format": fmt, "shape": shape, "N": n, "K": k, "variant": name,
                           "level": level, "config": list(cfg), "unroll": unroll, "split": split,
                           "programs": programs, "programs_per_sm": programs / SMS,
                           "code_bytes_in_flight_per_program": cfg[1] * cfg[2] // 2 * unroll,
                           "weight_bytes": nbytes, "ideal_us": nbytes / (ceiling * 1e6),
                           "read_bytes": read_bytes(level, n, k, 128, fmt.endswith("zero"), 2 * k)}

    def launch(w: torch.Tensor, q: dict) -> None:
        if level == 3:
            gemv(x, w, **q, fast=True, config=cfg, pdl=name == "d_real_pdl")
        else:
            fold(x, w, q["scale"], q["zero"], level, cfg, unroll, split)

    def run() -> None:
        for w, q in weights:
            launch(w, q)

    def warm() -> None:
        for w, q in weights[:2]:
            launch(w, q)

    return _timed(rec, run, len(weights), ceiling, warm)


def _timed(rec: dict, run, copies: int, ceiling: float, warm=None) -> dict:
    """rec with the time per launch of ``run`` (one launch a weight copy, in one CUDA graph:
    graph_seconds) and the GB/s and fractions of the copy ceiling of its weight and read bytes, or
    the error a config met (``warm`` runs first, outside the graph)."""
    try:
        if warm is not None:
            warm()
        s = graph_seconds(run) / copies
        rec.update(seconds=s, us=s * 1e6, GBps=rec["weight_bytes"] / s / 1e9, read_GBps=rec["read_bytes"] / s / 1e9,
                   of_copy_ceiling=rec["weight_bytes"] / s / 1e9 / (ceiling * 1e3),
                   read_of_copy_ceiling=rec["read_bytes"] / s / 1e9 / (ceiling * 1e3))
    except Exception as e:  # noqa: BLE001 - a config the compiler rejects
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    return rec


def measure_ceiling(name: str, shape: str, weights: list, nbytes: int, ceiling: float, fmt: str = FORMAT) -> dict:
    """A size-matched ceiling's JSON record (G_VARIANTS) at a shape, timed as measure() times the ladder."""
    n, k, _ = SHAPES[shape]
    code_bytes = weights[0][0].numel()
    moved = n * k * 2 if name == "g_copy_bf16" else code_bytes
    persist = 4 * SMS if name == "g_read_persist" else None
    programs = min(-(-code_bytes // (4 * STREAM_BLOCK)), persist or code_bytes) if name.startswith("g_read") else None
    rec: dict[str, Any] = {"kind": "measure", "format": fmt, "shape": shape, "N": n, "K": k, "variant": name,
                           "level": "ceiling", "programs": programs,
                           "weight_bytes": nbytes, "ideal_us": moved / (ceiling * 1e6), "read_bytes": moved}
    if name.startswith("g_copy"):  # a copy of half the bytes moves them all (read + write), as the ceiling counts
        size = moved // 2
        bufs = [(torch.randint(0, 255, (size,), dtype=torch.uint8, device=DEVICE),
                 torch.empty(size, dtype=torch.uint8, device=DEVICE)) for _ in weights]
        return _timed(rec, lambda: [dst.copy_(src) for src, dst in bufs], len(weights), ceiling)
    return _timed(rec, lambda: [stream_read(w, persist) for w, _ in weights], len(weights), ceiling)


# ---- Tile-major int4 ("t_*" rows): the hypothesis that the walk loses to g_read by its address order ----
# The fast path reads a K step of BLOCK_N rows as BLOCK_N strips of BLOCK_K / 2 bytes, one row (K / 2 bytes)
# apart; g_read reads each program's bytes as one run. Repacked once at load time (tile_int4), every
# program's (BLOCK_N x BLOCK_K) tile of code words is one contiguous chunk, the chunks of a column block in
# K order (so a program's whole share, all its K steps, is one run too, as g_read's 16 KB), and the group
# scales (and zero points) tiled the same way. Inside a tile each row's words stay in K order, so a thread
# still loads a run of RUN consecutive words of one row (RUN 4: one 128-bit load; RUN 8: two) and exactly
# their 32 or 64 inputs of x: the fast path's _int4_fast_x / _int4_fast_mac work unchanged on it.
# A ragged last K step (down: 11008 = 5 x 2048 + 768) is stored compactly as the block's last chunk (rows of
# K % BLOCK_K / 8 words): no padding along K. N is padded to a multiple of BLOCK_N with zero words and zero
# scales (none at the 7B shapes). Nothing else changes: same bytes, a permutation.
# name -> (BLOCK_N, BLOCK_K, RUN, num_warps, SPLIT), the likeliest first (a --budget-s cut drops the last).
# More columns a program divide the x bytes it requests from L2 per code byte (x: 2 bytes an input against
# BLOCK_N / 2 bytes of codes: at BLOCK_N 8 x is a third of what a program loads); split-K restores the
# programs that wider blocks take away at N 4096.
TILED_CONFIGS = {
    "n8k2048": (8, 2048, 4, 4, 1),        # the fast path's tile and grid (FAST_M1_CONFIGS["int4"])
    "n16k1024": (16, 1024, 4, 4, 1),
    "n16k2048": (16, 2048, 4, 4, 1),
    "n32k1024w8": (32, 1024, 4, 8, 1),
    "n8k2048r8": (8, 2048, 8, 4, 1),      # runs of 8 words a thread: two 128-bit loads, 64 inputs of x
    "n16k2048s2": (16, 2048, 4, 4, 2),
    "n32k1024s4": (32, 1024, 4, 4, 4),
    "n8k4096w8": (8, 4096, 4, 8, 1),
    "n32k512": (32, 512, 4, 4, 1),
    "n4k4096": (4, 4096, 4, 4, 1),
}
# The codes-only walk on the tiled layout (hypothesis (a): reaches g_read) at these configs' tiles and grids.
TILED_CODES = ["n8k2048", "n16k2048", "n16k2048s2"]  # a compile each per K: few (the runs of 8 load as n8k2048 does)
T_VARIANTS = ["t_codes", "t_gemv", "t_gemv_pdl"]  # t_gemv_pdl: each shape's best t_gemv config, with PDL


class TiledInt4:
    """An int4 weight in the tile-major layout (tile_int4): flat int32 code words, scales, zero points (or
    None), and the geometry they were tiled for."""

    def __init__(self, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, n: int, k: int,
                 group: int, block_n: int, block_k: int) -> None:
        self.words, self.scale, self.zero = words, scale, zero
        self.n, self.k, self.group, self.block_n, self.block_k = n, k, group, block_n, block_k

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero) if t is not None)


def _tile_cols(a: torch.Tensor, block_n: int, per_step: int, full: int) -> torch.Tensor:
    """a [Np, C] (C columns a row: words or groups; Np a multiple of block_n) -> flat, tile-major: per
    block of block_n rows, its `full` steps of per_step columns as [block_n, per_step] chunks, then the
    rest of its columns (the ragged step) as one [block_n, C - full * per_step] chunk."""
    np_, c = a.shape
    blocks = np_ // block_n
    head = a[:, :full * per_step].reshape(blocks, block_n, full, per_step).permute(0, 2, 1, 3)
    tail = a[:, full * per_step:].reshape(blocks, block_n * (c - full * per_step))
    return torch.cat([head.reshape(blocks, -1), tail], 1).reshape(-1)


def _untile_cols(flat: torch.Tensor, np_: int, c: int, block_n: int, per_step: int, full: int) -> torch.Tensor:
    """_tile_cols' inverse: flat -> [Np, C]."""
    blocks = np_ // block_n
    flat = flat.reshape(blocks, block_n * c)
    head = flat[:, :block_n * full * per_step].reshape(blocks, full, block_n, per_step).permute(0, 2, 1, 3)
    tail = flat[:, block_n * full * per_step:].reshape(blocks, block_n, c - full * per_step)
    return torch.cat([head.reshape(blocks, block_n, full * per_step), tail], 2).reshape(np_, c)


def tile_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, block_n: int,
              block_k: int) -> TiledInt4:
    """The load-time repack: kernels/quant.py's int4 layout (packed uint8 [N, K / 2], scale / zero [N, K / G])
    -> tile-major (the section comment above), for tiled_gemv at this (block_n, block_k). Lossless
    (untile_int4 gives the inputs back); the bytes are the same but for N's padding to block_n."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    group = k // scale.shape[1]
    if k % 32 or group % 32 or block_k % group or block_k & (block_k - 1) or block_k > k or k % group:
        raise ValueError(f"tile_int4: K {k}, group {group}, BLOCK_K {block_k} (want K and the group multiples of 32, "
                         "BLOCK_K a power of two of whole groups, at most K)")
    np_ = -(-n // block_n) * block_n
    full = k // block_k

    def rows(t: torch.Tensor) -> torch.Tensor:  # padded rows: zero words, zero scales (they add nothing)
        return t if np_ == n else torch.cat([t, t.new_zeros(np_ - n, t.shape[1])])

    words = rows(packed.contiguous().view(torch.int32))
    tiled = [_tile_cols(rows(t), block_n, block_k // group, full) if t is not None else None for t in (scale, zero)]
    return TiledInt4(_tile_cols(words, block_n, block_k // 8, full), tiled[0], tiled[1], n, k, group, block_n,
                     block_k)


def untile_int4(t: TiledInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """tile_int4's inverse: (packed uint8 [N, K / 2], scale [N, G], zero [N, G] or None)."""
    np_ = -(-t.n // t.block_n) * t.block_n
    full, g = t.k // t.block_k, t.k // t.group
    words = _untile_cols(t.words, np_, t.k // 8, t.block_n, t.block_k // 8, full)[:t.n]
    groups = [_untile_cols(a, np_, g, t.block_n, t.block_k // t.group, full)[:t.n] if a is not None else None
              for a in (t.scale, t.zero)]
    return words.contiguous().view(torch.uint8), groups[0], groups[1]


def tiled_check(config: tuple[int, int, int, int, int], n: int, k: int, group: int) -> None:
    """Raises ValueError where tiled_gemv cannot run the config at N x K: every split part needs at
    least one whole K step (the ragged one goes to the last part)."""
    block_n, block_k, run, warps, split = config
    full = k // block_k
    per = -(-full // split) if full else 0
    if full < 1 or (split - 1) * per >= full or run not in (1, 2, 4, 8) or block_k < 8 * run or block_k % group:
        raise ValueError(f"tiled_gemv: config {config} at K {k}, group {group}: {full} whole K steps for {split} "
                         "parts (each needs one), RUN 1/2/4/8 words within BLOCK_K, BLOCK_K whole groups")


if HAS_TRITON:

    @triton.jit
    def _tiled_tile(w_ptr, s_ptr, z_ptr, w_at, g_at, live, BLOCK_N: tl.constexpr, ROW_W: tl.constexpr,
                    ROW_G: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALES: tl.constexpr,
                    R: tl.constexpr, T: tl.constexpr, MASKED: tl.constexpr):
        """One tile's code words [BLOCK_N, R, T] (word t * R + r of tile row n at w_at + n * ROW_W + t * R + r:
        the tile is one contiguous chunk, a row's ROW_W words in K order) and, with SCALES, their group
        scales and zero points ([BLOCK_N, 1, T] where a run lies in one group, else [BLOCK_N, R, T]) at
        g_at + n * ROW_G + g: the layout _int4_fast_mac takes. MASKED: the ragged last step (ROW_W < R * T
        words a row), loaded where live [BLOCK_N] (its split part's rows); a whole step loads unmasked."""
        WPG: tl.constexpr = GROUP // 8
        n = tl.arange(0, BLOCK_N)[:, None, None]
        t = tl.arange(0, T)
        j = t[None, :] * R + tl.arange(0, R)[:, None]  # [R, T] word index within the tile's row
        if WPG % R == 0:
            g = (t * R // WPG)[None, :]
        else:
            g = j // WPG
        w_offs = w_at + n * ROW_W + j[None, :, :]
        if MASKED:
            words = tl.load(w_ptr + w_offs, mask=live[:, None, None] & (j < ROW_W)[None, :, :], other=0)
        else:
            words = tl.load(w_ptr + w_offs)
        scale = words
        zero = words
        if SCALES:
            g_offs = g_at + n * ROW_G + g[None, :, :]
            if MASKED:
                g_mask = live[:, None, None] & (g < ROW_G)[None, :, :]
                scale = tl.load(s_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
                zero = scale
                if HAS_ZERO:
                    zero = tl.load(z_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
            else:
                scale = tl.load(s_ptr + g_offs).to(tl.float32)
                zero = scale
                if HAS_ZERO:
                    zero = tl.load(z_ptr + g_offs).to(tl.float32)
        return words, scale, zero

    @triton.jit
    def _tiled_step(acc, tile, x_ptr, k0, K: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                    HAS_ZERO: tl.constexpr, CODES_ONLY: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        """acc += the tile of the step at k0: its words folded (CODES_ONLY), or the fast path's dequantized
        products with x (the step's inputs loaded as runs: _int4_fast_x; fp32, _int4_fast_mac)."""
        words, scale, zero = tile
        if CODES_ONLY:
            return acc + words
        else:
            xc, xw = _int4_fast_x(x_ptr, k0, x_ptr, 1.0, K, R, T, False, BF16_BY_HAND)
            return _int4_fast_mac(acc, words, scale, zero, xc, xw, HAS_ZERO)

    @triton.jit
    def _tiled_split_sum(y, ws_ptr, count_ptr, cols, SPLIT: tl.constexpr):
        """Split-K as gemv's _split_k_sum, one output row: this part's sums y [BLOCK_N] into the workspace
        [SPLIT, padded N], the column block's arrival count raised; the last part to arrive gets the SPLIT
        partials summed in their fixed order (the same result whichever is last) and resets the count."""
        stride = tl.num_programs(0) * y.shape[0]
        tl.store(ws_ptr + tl.program_id(1) * stride + cols, y)
        tl.debug_barrier()  # every thread's partials stored before the release below
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        last = (tl.zeros(cols.shape, tl.int32) + arrived) == SPLIT - 1  # a tile (a scalar mask: not interpretable)
        y = tl.zeros_like(y)
        for part in tl.static_range(SPLIT):  # past L1: other SMs wrote them
            y += tl.load(ws_ptr + part * stride + cols, mask=last, other=0.0, cache_modifier=".cg")
        tl.atomic_add(count_ptr + tl.program_id(0), -SPLIT * (arrived == SPLIT - 1).to(tl.int32), sem="relaxed",
                      scope="gpu")
        return y, last

    @triton.jit
    def _tiled_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, N, K: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr, GROUP: tl.constexpr,
                           HAS_ZERO: tl.constexpr, SPLIT: tl.constexpr, CODES_ONLY: tl.constexpr,
                           BF16_BY_HAND: tl.constexpr, OUT_BY_HAND: tl.constexpr, PDL: tl.constexpr):
        """y = x @ W^T at M == 1 on the tile-major layout (tile_int4): program (b, p) takes column block b's
        whole K steps p * PER .. (p + 1) * PER (split part p of SPLIT; the ragged last step goes to the last
        part), each step's tile one contiguous chunk, loaded one step ahead of its use (as the fast path:
        two steps' words in flight). CODES_ONLY: the codes-only walk, the wrapping int32 sum of the words a
        program read stored at out[b * SPLIT + p] (tiled_fold_ref); else fp32 sums, the parts summed by the
        last to arrive (_tiled_split_sum), rounded once to out's dtype."""
        T: tl.constexpr = BLOCK_K // (8 * R)
        FULL: tl.constexpr = K // BLOCK_K
        REM: tl.constexpr = K % BLOCK_K
        PER: tl.constexpr = (FULL + SPLIT - 1) // SPLIT
        TILE_W: tl.constexpr = BLOCK_N * (BLOCK_K // 8)
        TILE_G: tl.constexpr = BLOCK_N * (BLOCK_K // GROUP)
        SCALES: tl.constexpr = not CODES_ONLY
        block = tl.program_id(0)
        part = tl.program_id(1)
        w_blk = block.to(tl.int64) * (BLOCK_N * (K // 8))  # the column block's chunks start here
        g_blk = block.to(tl.int64) * (BLOCK_N * (K // GROUP))
        first = part * PER
        last = tl.minimum(first + PER, FULL)
        rows = tl.arange(0, BLOCK_N)
        a = _tiled_tile(w_ptr, s_ptr, z_ptr, w_blk + first * TILE_W, g_blk + first * TILE_G, rows, BLOCK_N,
                        BLOCK_K // 8, BLOCK_K // GROUP, GROUP, HAS_ZERO, SCALES, R, T, False)
        if PDL:  # the first tile requested before waiting on the kernel before (as the fast path)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if CODES_ONLY:
            acc = tl.zeros([BLOCK_N, R, T], tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, 1 if (GROUP // 8) % R == 0 else R, T], tl.float32)  # as the scales
        for s in range(first + 1, last):
            b = _tiled_tile(w_ptr, s_ptr, z_ptr, w_blk + s * TILE_W, g_blk + s * TILE_G, rows, BLOCK_N,
                            BLOCK_K // 8, BLOCK_K // GROUP, GROUP, HAS_ZERO, SCALES, R, T, False)
            acc = _tiled_step(acc, a, x_ptr, (s - 1) * BLOCK_K, K, R, T, HAS_ZERO, CODES_ONLY, BF16_BY_HAND)
            a = b
        if REM > 0:  # the ragged step's chunk, requested before the last whole step is used
            live = (tl.zeros([BLOCK_N], tl.int32) + part) == SPLIT - 1
            tail = _tiled_tile(w_ptr, s_ptr, z_ptr, w_blk + FULL * TILE_W, g_blk + FULL * TILE_G, live, BLOCK_N,
                               REM // 8, REM // GROUP, GROUP, HAS_ZERO, SCALES, R, T, True)
            acc = _tiled_step(acc, a, x_ptr, (last - 1) * BLOCK_K, K, R, T, HAS_ZERO, CODES_ONLY, BF16_BY_HAND)
            acc = _tiled_step(acc, tail, x_ptr, FULL * BLOCK_K, K, R, T, HAS_ZERO, CODES_ONLY, BF16_BY_HAND)
        else:
            acc = _tiled_step(acc, a, x_ptr, (last - 1) * BLOCK_K, K, R, T, HAS_ZERO, CODES_ONLY, BF16_BY_HAND)
        if CODES_ONLY:
            tl.store(out_ptr + block * SPLIT + part, tl.sum(tl.sum(tl.sum(acc, 2), 1), 0))
        else:
            y = tl.sum(tl.sum(acc, 2), 1)  # [BLOCK_N]: in-thread first
            cols = block * BLOCK_N + rows
            mask = cols < N
            if SPLIT > 1:
                y, last_part = _tiled_split_sum(y, ws_ptr, count_ptr, cols, SPLIT)
                mask = mask & last_part
            tl.store(out_ptr + cols, _rnd(y, out_ptr.dtype.element_ty, OUT_BY_HAND).to(out_ptr.dtype.element_ty),
                     mask=mask)


def tiled_gemv(x: torch.Tensor, w: TiledInt4, config: tuple[int, int, int, int, int], out_dtype=None,
               pdl: bool = False, codes_only: bool = False) -> torch.Tensor:
    """x [1, K] @ W^T on the tile-major weight w at config (BLOCK_N, BLOCK_K, RUN, num_warps, SPLIT), whose
    tile must be w's: [1, N] in out_dtype (x's by default; fp32 for a check at fp32 tolerance). codes_only:
    the codes-only walk instead, [column blocks, SPLIT] int32 folds (tiled_fold_ref)."""
    block_n, block_k, run, warps, split = config
    if x.shape != (1, w.k) or (block_n, block_k) != (w.block_n, w.block_k):
        raise ValueError(f"tiled_gemv: x {tuple(x.shape)} (want (1, {w.k})), tile {(block_n, block_k)} "
                         f"(the weight's: {(w.block_n, w.block_k)})")
    tiled_check(config, w.n, w.k, w.group)
    blocks = -(-w.n // block_n)
    out_dtype = out_dtype or x.dtype
    if codes_only:
        out = torch.empty(blocks, split, dtype=torch.int32, device=x.device)
    else:
        out = torch.empty(1, w.n, dtype=out_dtype, device=x.device)
    ws, count = out, out
    if split > 1 and not codes_only:  # gemv's split-K buffers: [SPLIT, padded N] partials, a count a column block
        ws, count = SPLIT_K_WORKSPACE.get(x.device, split * blocks * block_n, blocks)
    launch = pdl_launch_args(pdl, x.device)
    _tiled_gemv_kernel[(blocks, split)](
        x, w.words, w.scale, w.zero if w.zero is not None else w.scale, out, ws, count, w.n, K=w.k,
        BLOCK_N=block_n, BLOCK_K=block_k, R=run, GROUP=w.group, HAS_ZERO=w.zero is not None and not codes_only,
        SPLIT=split,
        CODES_ONLY=codes_only, BF16_BY_HAND=interpreting() and x.dtype == torch.bfloat16,
        OUT_BY_HAND=interpreting() and out_dtype == torch.bfloat16, **launch, num_warps=warps)
    return out


def tiled_gemv_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   out_dtype=None) -> torch.Tensor:
    """What tiled_gemv computes, on the original layout: x times the fp32 dequantized weight in fp32
    (kernels/quant.py's int4_linear_fast_ref), rounded once to out_dtype (x's by default)."""
    w = ref.dequantize_grouped(ref.unpack_int4(packed), scale, zero)
    return torch.nn.functional.linear(x.float(), w).to(out_dtype or x.dtype)


def tiled_fold_ref(packed: torch.Tensor, config: tuple[int, int, int, int, int]) -> torch.Tensor:
    """The codes-only walk's folds [column blocks, SPLIT] in torch, from the original layout: per program the
    wrapping sum of the words of its rows and its K steps (the ragged step: the last part's)."""
    block_n, block_k, _, _, split = config
    n, k = packed.shape[0], 2 * packed.shape[1]
    words = packed.contiguous().view(torch.int32).long().cpu()
    full = k // block_k
    per = -(-full // split)
    out = torch.empty(-(-n // block_n), split, dtype=torch.int32)
    for b in range(out.shape[0]):
        for p in range(split):
            hi = min((p + 1) * per, full) * block_k // 8 if p < split - 1 else k // 8
            out[b, p] = _wrap(int(words[b * block_n:(b + 1) * block_n, p * per * block_k // 8:hi].sum()))
    return out


def tiled_bytes(config: tuple[int, int, int, int, int], n: int, k: int, group: int, zero: bool,
                codes_only: bool) -> dict:
    """The bytes a tiled variant moves: codes (+ scales, zeros, x, output) read or written once from DRAM
    ("read_bytes": what its GB/s is counted on), the x bytes its programs request (each column block reads
    its K range of x: from L2 after the first), split-K's partials (written, then read by the last) and the
    fp32 output (the rows time fp32 output: the kernel their check ran)."""
    block_n, block_k, _, _, split = config
    blocks = -(-n // block_n)
    codes = blocks * block_n * k // 2
    groups = 0 if codes_only else blocks * block_n * (k // group) * 4 * (2 if zero else 1)
    x_bytes = 0 if codes_only else 2 * k
    ws = 0 if codes_only or split == 1 else 2 * split * blocks * block_n * 4
    return {"code_bytes": codes, "scale_bytes": groups, "x_bytes": x_bytes,
            "x_bytes_requested": 0 if codes_only else blocks * 2 * k, "split_bytes": ws,
            "out_bytes": 0 if codes_only else 4 * n, "read_bytes": codes + groups + x_bytes}  # fp32 out, as timed


def tiled_sass_stats(cfg_name: str, n: int, k: int, codes_only: bool, zero: bool = False, group: int = 128) -> dict:
    """A tiled variant's sm_90 loads, registers, spills and programs an SM (as sass_stats; Triton's bundled
    ptxas, no GPU): the check that the tile-major codes still load as 128-bit runs, and what a program holds."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from experiments.gemv_sass_count import BIN, load_stats, loop_body, programs_per_sm, resources

    cfg = TILED_CONFIGS[cfg_name]
    block_n, block_k, run, warps, split = cfg
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*i32" if codes_only
           else "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", "N": "i32"}
    constexprs = dict(K=k, BLOCK_N=block_n, BLOCK_K=block_k, R=run, GROUP=group, HAS_ZERO=zero, SPLIT=split,
                      CODES_ONLY=codes_only, BF16_BY_HAND=False, OUT_BY_HAND=False, PDL=False)
    sig.update({key: "constexpr" for key in constexprs})
    aligned = [key for key, ty in sig.items() if ty.startswith("*") or (key == "N" and n % 16 == 0)]  # as a launch
    attrs = {(_tiled_gemv_kernel.arg_names.index(key),): [["tt.divisibility", 16]] for key in aligned}
    kernel = triton.compile(ASTSource(_tiled_gemv_kernel, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        regs, spill = resources(f.name)
    body, looped = loop_body(sass)
    loads = load_stats(body)
    resident = programs_per_sm(regs, warps, -(-n // block_n) * split)
    return {"kind": "sass", "variant": "t_codes" if codes_only else "t_gemv", "tconfig": cfg_name, "N": n, "K": k,
            "config": list(cfg), "zero": zero, "counted": "loop" if looped else "kernel", "ldg": loads["ldg"],
            "ldg_bytes_per_thread": loads["ldg_bytes"], "regs": regs, "spill_bytes": spill,
            "programs_per_sm": resident}

def tiled_measure(name: str, cfg_name: str, fmt: str, shape: str, weights: list, tiled: list, nbytes: int,
                  x: torch.Tensor, ceiling: float, pdl: bool = False) -> dict:
    """A t_* row's JSON record at a shape (t_codes: the codes-only walk; t_gemv, t_gemv_pdl: the GEMV) at
    TILED_CONFIGS[cfg_name] on the tiled copies of weights, after a check on the first copy against the
    torch reference (the folds exactly; the GEMV's fp32 output within fp32 rounding), then timed as
    measure() times the ladder."""
    n, k, _ = SHAPES[shape]
    cfg = TILED_CONFIGS[cfg_name]
    block_n, block_k, run, warps, split = cfg
    codes_only = name == "t_codes"
    zero = fmt.endswith("zero")
    programs = -(-n // block_n) * split
    rec: dict[str, Any] = {"kind": "measure", "format": fmt, "shape": shape, "N": n, "K": k, "variant": name,
                           "level": "tiled", "tconfig": cfg_name, "config": list(cfg), "split": split,
                           "programs": programs, "programs_per_sm": programs / SMS,
                           "code_bytes_in_flight_per_program": block_n * block_k // 2 * 2,  # a step ahead
                           "weight_bytes": nbytes, "ideal_us": nbytes / (ceiling * 1e6),
                           **tiled_bytes(cfg, n, k, 128, zero, codes_only)}
    try:
        tiled_check(cfg, n, k, 128)
        w0, q0 = weights[0]
        if codes_only:
            got = tiled_gemv(x, tiled[0], cfg, codes_only=True).cpu()
            rec["check_ok"] = bool(torch.equal(got, tiled_fold_ref(w0, cfg)))
        else:
            got = tiled_gemv(x, tiled[0], cfg, out_dtype=torch.float32, pdl=pdl)
            expected = tiled_gemv_ref(x, w0, q0["scale"], q0["zero"], torch.float32)
            rec["check_rel_err"] = float((got - expected).norm() / expected.norm())
            rec["check_ok"] = rec["check_rel_err"] < 1e-5 and bool(torch.isfinite(got).all())
    except Exception as e:  # noqa: BLE001 - a config this shape cannot take, or the compiler rejects
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        return rec

    def run() -> None:  # fp32 output, as checked: one compiled kernel (bf16's rounding is one cvt a column)
        for t in tiled:
            tiled_gemv(x, t, cfg, out_dtype=torch.float32, pdl=pdl, codes_only=codes_only)

    return _timed(rec, run, len(tiled), ceiling)


def tiled_pass(names: list[str], cfg_names: list[str], fmt: str, shape: str, log, over_budget) -> list[str]:
    """The t_* rows of one shape: per config (TILED_CONFIGS order, each tiled once at load time), t_codes
    where the config is in TILED_CODES and t_gemv; then t_gemv_pdl at the shape's fastest t_gemv config.
    Returns the (variant, config) rows the budget cut."""
    n, k, _ = SHAPES[shape]
    weights, nbytes = make_weights(fmt, n, k, max(8, -(-COPY_BYTES // (n * k // 2))), dev=DEVICE)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    skipped, best = [], None
    for cfg_name in cfg_names:
        rows = [v for v in names if (v == "t_codes" and cfg_name in TILED_CODES) or v == "t_gemv"]
        if not rows:
            continue
        if over_budget():
            skipped += [f"{shape}:{v}:{cfg_name}" for v in rows]
            continue
        block_n, block_k = TILED_CONFIGS[cfg_name][:2]
        try:
            tiled = [tile_int4(w, q["scale"], q["zero"], block_n, block_k) for w, q in weights]  # the load-time repack
        except ValueError as e:  # a tile this shape cannot take (BLOCK_K past K)
            for v in rows:
                log.emit({"kind": "measure", "format": fmt, "shape": shape, "N": n, "K": k, "variant": v,
                          "level": "tiled", "tconfig": cfg_name, "config": list(TILED_CONFIGS[cfg_name]),
                          "error": f"ValueError: {e}"[:300]})
            continue
        for v in rows:
            rec = tiled_measure(v, cfg_name, fmt, shape, weights, tiled, nbytes, x, log.ceiling)
            log.emit(rec)
            if v == "t_gemv" and "us" in rec and rec.get("check_ok") and (best is None or rec["us"] < best[1]):
                best = (cfg_name, rec["us"])
        del tiled
    if "t_gemv_pdl" in names and best is not None:
        if over_budget():
            skipped.append(f"{shape}:t_gemv_pdl:{best[0]}")
        else:
            block_n, block_k = TILED_CONFIGS[best[0]][:2]
            tiled = [tile_int4(w, q["scale"], q["zero"], block_n, block_k) for w, q in weights]
            log.emit(tiled_measure("t_gemv_pdl", best[0], fmt, shape, weights, tiled, nbytes, x, log.ceiling,
                                   pdl=True))
            del tiled
    del weights
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return skipped


def rank_tiled(records: list[dict], fmt: str, cfg_names: list[str]) -> list[str]:
    """cfg_names with those timed (t_gemv, checked) on every shape fmt's rows have first, by their total time
    over the shapes, the rest after in their order: the next format's t_* rows run the likeliest first, so
    a --budget-s cut drops the slowest."""
    rows = [r for r in records if r["format"] == fmt and r["variant"] == "t_gemv" and "us" in r and r.get("check_ok")]
    shapes = {r["shape"] for r in records if r["format"] == fmt}
    times: dict[str, dict[str, float]] = {}
    for r in rows:
        times.setdefault(r["tconfig"], {})[r["shape"]] = r["us"]
    total = {c: sum(t.values()) for c, t in times.items() if set(t) == shapes}
    return sorted((c for c in cfg_names if c in total), key=total.get) + [c for c in cfg_names if c not in total]

def tiled_summary(records: list[dict], fmt: str, shape: str) -> dict:
    """One line a shape setting the tiled rows beside the ladder's (us, and the share of g_read's time:
    g_read_us / us, 1.0 = as fast as a plain read of the codes): g_read, a_codes (the fast path's
    codes-only walk), d_real (+ PDL), the best t_codes and t_gemv (and its config), t_gemv_pdl."""
    mine = [r for r in records if r["format"] == fmt and r["shape"] == shape and "us" in r]
    # g_read moves the codes alone: whatever format timed it (the ceiling rows are format-blind)
    reads = [r["us"] for r in records if r["shape"] == shape and r["variant"] == "g_read" and "us" in r]
    g_read = reads[-1] if reads else None
    out: dict[str, Any] = {"kind": "tiled_summary", "format": fmt, "shape": shape, "g_read_us": g_read}
    for v in ("a_codes", "d_real", "d_real_pdl", "t_codes", "t_gemv", "t_gemv_pdl"):
        rows = [r for r in mine if r["variant"] == v and r.get("check_ok", True)]
        if not rows:
            continue
        top = min(rows, key=lambda r: r["us"])
        out[f"{v}_us"] = top["us"]
        if "tconfig" in top:
            out[f"{v}_config"] = top["tconfig"]
        if g_read:
            out[f"{v}_of_g_read"] = g_read / top["us"]
    if "t_gemv_us" in out and "d_real_pdl_us" in out:
        out["t_gemv_speedup_vs_d_real_pdl"] = out["d_real_pdl_us"] / out["t_gemv_us"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    # the t_* rows only when named: the default run (engine_session.sh int4bound, 100 s) stays the ladder's
    ap.add_argument("--variants", nargs="+", default=VARIANTS + G_VARIANTS, choices=VARIANTS + G_VARIANTS + T_VARIANTS)
    ap.add_argument("--formats", nargs="+", default=[FORMAT], choices=[FORMAT, FORMAT + "_zero"],
                    help="int4 g128 symmetric, and with zero points (each format's rows in turn)")
    ap.add_argument("--tiled-configs", nargs="+", default=list(TILED_CONFIGS), choices=list(TILED_CONFIGS),
                    help="the t_* rows' configs (TILED_CONFIGS), in this order")
    ap.add_argument("--tiled-top", type=int, default=3,
                    help="formats after the first run only this many t_gemv configs: the first's fastest in total")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="past this many seconds from the start, skip the t_* and e_* rows still to come "
                         "(the ladder's and g_* rows always run); the done line lists what was skipped")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--sass", action="store_true", help="no GPU: each variant's sm_90 loads, registers, residency")
    args = ap.parse_args(argv)
    if args.sass:
        for shape in args.shapes:
            for name in args.variants:
                if name != "d_real_pdl" and name not in G_VARIANTS + T_VARIANTS:
                    print(json.dumps({"shape": shape, **sass_stats(name, *SHAPES[shape][:2])}), flush=True)
            for cfg_name in args.tiled_configs:
                for name in [v for v in ("t_codes", "t_gemv") if v in args.variants]:
                    if name == "t_gemv" or cfg_name in TILED_CODES:
                        try:
                            rec = tiled_sass_stats(cfg_name, *SHAPES[shape][:2], name == "t_codes",
                                                   args.formats[-1].endswith("zero"))
                        except Exception as e:  # noqa: BLE001 - a config this shape cannot take
                            rec = {"variant": name, "tconfig": cfg_name, "error": f"{type(e).__name__}: {e}"[:200]}
                        print(json.dumps({"shape": shape, **rec}), flush=True)
        return
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("int4_bound needs a CUDA GPU")
    started = time.perf_counter()

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - started > args.budget_s

    log = Records(args.json, DEVICE, copy_ceiling_tbps())
    skipped: list[str] = []
    cfg_names = list(args.tiled_configs)
    for fmt in args.formats:
        # the ladder on every shape first, then the g_*, t_* and e_* rows: a run cut short keeps whole ladders
        passes = [[v for v in args.variants if v[:2] not in ("e_", "g_", "t_")],
                  [v for v in args.variants if v.startswith("g_")], [v for v in args.variants if v.startswith("t_")],
                  [v for v in args.variants if v.startswith("e_")]]
        for names in (p for p in passes if p):
            for shape in args.shapes:
                if names[0].startswith("t_"):
                    skipped += tiled_pass(names, cfg_names, fmt, shape, log, over_budget)
                    continue
                if names[0].startswith("e_") and over_budget():
                    skipped += [f"{shape}:{v}" for v in names]
                    continue
                n, k, _ = SHAPES[shape]
                weights, nbytes = make_weights(fmt, n, k, max(8, -(-COPY_BYTES // (n * k // 2))), dev=DEVICE)
                x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
                for name in names:
                    log.emit(measure(name, shape, weights, nbytes, x, log.ceiling, fmt))
                del weights
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        if any(v.startswith("t_") for v in args.variants):
            for shape in args.shapes:
                log.emit(tiled_summary(log.records, fmt, shape))
            cfg_names = rank_tiled(log.records, fmt, cfg_names)[:args.tiled_top]  # a compile each per K: few
    log.emit({"kind": "done", "wall_s": time.perf_counter() - started, "budget_skipped": skipped})
    log.close()


if __name__ == "__main__":
    main()
