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
  launch a weight copy in the same graph, so a ladder row can be held to what its byte count allows.
Shapes: Llama-2-7B's four decode linears as plain N x K matmuls (gate_up's 22016 rows as one set,
no SwiGLU pairing), int4 g128. One JSON line each: us, GB/s of the weight bytes (codes + scales,
as the sweep counts them) and of the bytes the variant reads, the fraction of the copy ceiling,
the programs and the code bytes a program has in flight.

    python experiments/int4_bound.py --json int4_bound.jsonl [--shapes qkv down] [--variants a_codes e_split4]
    python experiments/int4_bound.py --sass [--shapes ...]   # no GPU: sm_90 loads, registers, programs an SM

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
import time
from typing import Any

import torch

from eval.bench.common import graph_seconds
from experiments.quant_gemv_sweep import COPY_BYTES, SHAPES, Records, copy_ceiling_tbps, make_weights
from kernels._triton import HAS_TRITON, interpreting, next_pow2
from kernels.gemv import FAST_UNROLL, _fast_words, fast_gemv_config, gemv

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.gemv import _int4_fast_tile, _int4_fast_x, _w_rows

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
        R: tl.constexpr = 4 if BLOCK_K >= 32 else BLOCK_K // 8  # as _matmul_fast_runs
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


def measure(name: str, shape: str, weights: list, nbytes: int, x: torch.Tensor, ceiling: float) -> dict:
    """One variant's JSON record at a shape: config, programs, bytes, and its time per launch over all
    weight copies in one CUDA graph (graph_seconds), or the error a config met."""
    n, k, _ = SHAPES[shape]
    if name in G_VARIANTS:
        return measure_ceiling(name, shape, weights, nbytes, ceiling)
    cfg, level, unroll, split = variant_config(name, n, k, 128)
    programs = -(-n // cfg[1]) * split
    rec: dict[str, Any] = {"kind": "measure", "format": FORMAT, "shape": shape, "N": n, "K": k, "variant": name,
                           "level": level, "config": list(cfg), "unroll": unroll, "split": split,
                           "programs": programs, "programs_per_sm": programs / SMS,
                           "code_bytes_in_flight_per_program": cfg[1] * cfg[2] // 2 * unroll,
                           "weight_bytes": nbytes, "ideal_us": nbytes / (ceiling * 1e6),
                           "read_bytes": read_bytes(level, n, k, 128, False, 2 * k)}

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


def measure_ceiling(name: str, shape: str, weights: list, nbytes: int, ceiling: float) -> dict:
    """A size-matched ceiling's JSON record (G_VARIANTS) at a shape, timed as measure() times the ladder."""
    n, k, _ = SHAPES[shape]
    code_bytes = weights[0][0].numel()
    moved = n * k * 2 if name == "g_copy_bf16" else code_bytes
    persist = 4 * SMS if name == "g_read_persist" else None
    programs = min(-(-code_bytes // (4 * STREAM_BLOCK)), persist or code_bytes) if name.startswith("g_read") else None
    rec: dict[str, Any] = {"kind": "measure", "format": FORMAT, "shape": shape, "N": n, "K": k, "variant": name,
                           "level": "ceiling", "programs": programs,
                           "weight_bytes": nbytes, "ideal_us": moved / (ceiling * 1e6), "read_bytes": moved}
    if name.startswith("g_copy"):  # a copy of half the bytes moves them all (read + write), as the ceiling counts
        size = moved // 2
        bufs = [(torch.randint(0, 255, (size,), dtype=torch.uint8, device=DEVICE),
                 torch.empty(size, dtype=torch.uint8, device=DEVICE)) for _ in weights]
        return _timed(rec, lambda: [dst.copy_(src) for src, dst in bufs], len(weights), ceiling)
    return _timed(rec, lambda: [stream_read(w, persist) for w, _ in weights], len(weights), ceiling)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=VARIANTS + G_VARIANTS, choices=VARIANTS + G_VARIANTS)
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--sass", action="store_true", help="no GPU: each variant's sm_90 loads, registers, residency")
    args = ap.parse_args(argv)
    if args.sass:
        for shape in args.shapes:
            for name in args.variants:
                if name != "d_real_pdl" and name not in G_VARIANTS:
                    print(json.dumps({"shape": shape, **sass_stats(name, *SHAPES[shape][:2])}), flush=True)
        return
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("int4_bound needs a CUDA GPU")
    started = time.perf_counter()
    log = Records(args.json, DEVICE, copy_ceiling_tbps())
    # the ladder on every shape first, then the e_* rows: a run cut short keeps whole ladders
    passes = [[v for v in args.variants if v[:2] not in ("e_", "g_")], [v for v in args.variants if v.startswith("g_")],
              [v for v in args.variants if v.startswith("e_")]]
    for names in (p for p in passes if p):
        for shape in args.shapes:
            n, k, _ = SHAPES[shape]
            weights, nbytes = make_weights(FORMAT, n, k, max(8, -(-COPY_BYTES // (n * k // 2))), dev=DEVICE)
            x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
            for name in names:
                log.emit(measure(name, shape, weights, nbytes, x, log.ceiling))
            del weights
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    log.emit({"kind": "done", "wall_s": time.perf_counter() - started})
    log.close()


if __name__ == "__main__":
    main()
