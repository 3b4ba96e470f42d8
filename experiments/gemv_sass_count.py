"""SASS instructions per weight byte of kernels/gemv.py's decode GEMV (M == 1, exact against fast
dequantization; int4's and int8's exact path also at M == 16, the one kernel of every 1 < M <= 16),
compiled for sm_90 with Triton's bundled ptxas: no GPU needed. The K loop's body
(the block between the label and the backward branch) is counted per thread and divided by the
weight bytes a thread reads per K step; conversions (I2F, F2F, F2FP) are listed separately, as
they issue at a fraction of the FMA rate on Hopper. Fully unrolled loops (K / BLOCK_K small)
count the whole kernel over all its steps instead. The global loads are listed by width (LDG.E:
32-bit, LDG.E.128: 128-bit, LDG.E.U16: a 16-bit x value ...) with the bytes a thread loads in the
counted code ("ldg_bytes") and before its first FFMA ("ldg_bytes_before_ffma": what is in flight
before the first multiply waits; in a pipelined loop, the next tile's prefetch), kernel-wide too,
the registers and spills, the programs one SM holds at --n (registers, warps, grid) and the
bytes they have loaded before their first FFMA (Little's law: the H200 wants ~32 KB in flight per
SM to stream at its copy rate).

    python experiments/gemv_sass_count.py [--k 4096] [--n 4096] [--entry 8,4096,4 ...] [--tile 16,16,512,2 ...]

Counted on this branch (sm_90, bf16, no fusion; instructions per weight byte, registers, spills):
    int8 fast M == 1 at (8, 4096, 4), K 4096 / 11008: 5.69 / 5.04, 128 / 229 regs (x gathered per
    code: 32 LDG.E.U16 and a PRMT + LOP3 per code) -> 4.88 / 4.25, 96 / 158 regs (_matmul_fast_runs:
    LDG.E.128 code runs, LDG.E.64 x, per code PRMT + FADD + FFMA, a MOV and an XOR a word); 4.1 /
    3.96 at (8, 1024, 2). No spills. bf16 M == 1: 3.12. The H200 timed the run path slower at every
    Llama-2-7B shape: int8 is back on the gather (_matmul_fast; kernels/gemv.py's docstring).
    int8 exact M == 16 at gemv_config's (16, 32, 256, 4): 5.02 (LDGSTS to shared, LDS, IMAD / LOP3 /
    PRMT / HADD2 conversion to bf16, HMMA), 80 regs, and one program of 4 warps an SM at N 4096
    (128 programs): latency bound, with half the bytes of bf16's tile in flight.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import gemv as G

VARIANTS = {  # name -> (quant, fast, group, zero, M)
    "int8_exact": ("int8", False, 1, False, 1), "int8_fast": ("int8", True, 1, False, 1),
    "int4_g128_exact": ("int4", False, 128, False, 1), "int4_g128_fast": ("int4", True, 128, False, 1),
    "int4_g128_zero_fast": ("int4", True, 128, True, 1), "bf16": ("dense", False, 1, False, 1),
    "int4_g128_m16_exact": ("int4", False, 128, False, 16), "int8_m16_exact": ("int8", False, 1, False, 16),
}
CONVERSIONS = ("I2F", "F2F", "F2FP", "I2FP")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SMS = 132  # an H200's SMs


def compile_sm90(quant: str, fast: bool, group: int, zero: bool, m: int, n: int, k: int,
                 entry: tuple[int, int, int] | None = None, fusions: dict | None = None,
                 tile: tuple[int, int, int, int] | None = None) -> tuple[bytes, tuple]:
    """The cubin of _gemv_kernel for M rows (bf16; plain, or with ``fusions``: NORM, RESIDUAL,
    SWIGLU, HAS_BIAS flags) and its config (the fast path's at ``entry``; the exact path's
    gemv_config, or ``tile``), specialized as a launch on torch tensors is."""
    two = bool((fusions or {}).get("SWIGLU"))
    cfg = G.fast_gemv_config(n, k, quant, group, two, entry) if fast else tile or G.gemv_config(m, n, k, two)
    wty = "*i32" if fast else {"int4": "*u8", "dense": "*bf16"}.get(quant, "*i8")
    sig = {"x_ptr": "*bf16", "w_ptr": wty, "s_ptr": "*fp32", "z_ptr": "*fp32", "b_ptr": "*bf16",
           "nw_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32",
           "count_ptr": "*i32", "M": "i32", "eps": "fp32",
           "x_stride": "i32", "res_stride": "i32", "out_stride": "i32"}
    gpt, wpg = G._fast_words(quant, group, cfg[2]) if fast else (1, 1)
    constexprs = dict(N=n, K=k, BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2], HAS_BIAS=False, NORM=False,
                      RESIDUAL=False, SWIGLU=False, IEEE=False, BF16_BY_HAND=False, PDL=True,
                      GROUP=group, QUANT=G.QUANT_KINDS[quant], HAS_ZERO=zero, FAST=fast, GPT=gpt, WPG=wpg, SPLIT=1,
                      RUN=G.FAST_INT4_RUN if fast and quant == "int4" else 4)  # as _launch_config passes it
    constexprs.update(fusions or {})
    sig.update({name: "constexpr" for name in constexprs})
    # As a launch specializes them: torch's tensors 16-byte aligned, the row strides (K, N) multiples
    # of 16. Without this divisibility no load is vectorized (every word an LDG.E).
    ints = {"x_stride": k, "res_stride": n, "out_stride": n}
    aligned = [name for name, ty in sig.items() if ty.startswith("*") or ints.get(name, 1) % 16 == 0]
    attrs = {(G._gemv_kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(G._gemv_kernel, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg[3]})
    return kernel.asm["cubin"], cfg


def _opcode(line: str, full: bool = False) -> str | None:
    """The instruction's opcode (``full``: with its modifiers, LDG.E.128), predicate stripped."""
    m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+(?:\.[A-Z0-9_]+)*)", line)
    if not m:
        return None
    return m.group(1) if full else m.group(1).split(".")[0]


def ldg_bytes(op: str) -> int:
    """Bytes one thread loads with a global load opcode (LDG.E: 32-bit)."""
    mods = op.split(".")[1:]
    for width, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in mods:
            return nbytes
    return 4


def load_stats(body: list[str]) -> dict:
    """The global loads of ``body`` (LDG, and LDGSTS: global to shared) by width, their bytes per
    thread, and the bytes loaded before its first FFMA."""
    widths: collections.Counter = collections.Counter()
    before, seen_ffma = 0, False
    for line in body:
        op = _opcode(line, full=True)
        if op is None:
            continue
        if op.startswith("FFMA"):
            seen_ffma = True
        if op.split(".")[0] in ("LDG", "LDGSTS"):  # LDGSTS: the M > 1 tl.dot pipeline's copies into shared memory
            widths[op] += 1
            before += 0 if seen_ffma else ldg_bytes(op)
    return {"ldg": dict(widths.most_common()), "ldg_bytes": sum(ldg_bytes(op) * n for op, n in widths.items()),
            "ldg_bytes_before_ffma": before}


def sass_lines(sass: str) -> list[str]:
    return [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]


def loop_body(sass: str) -> tuple[list[str], bool]:
    """The instructions of the largest backward-branch loop, or of the whole kernel (and False) if none."""
    lines = sass_lines(sass)
    addr = {i: int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16) for i, line in enumerate(lines)}
    labels, pending = {}, None
    for raw in sass.splitlines():
        m = re.match(r"\.L_x_(\d+):", raw.strip())
        if m:
            pending = m.group(1)
        elif pending and re.match(r"\s+/\*[0-9a-f]{4,}\*/", raw):
            labels[pending] = int(re.match(r"\s+/\*([0-9a-f]+)\*/", raw).group(1), 16)
            pending = None
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
        if m and labels.get(m.group(1), 1 << 40) < addr[i]:
            body = [x for j, x in enumerate(lines) if labels[m.group(1)] <= addr[j] <= addr[i]]
            best = max(best, body, key=len)
    return best or lines, bool(best)


def loop_ops(sass: str) -> tuple[collections.Counter, bool]:
    """Opcode counts of the largest backward-branch loop, or of the whole kernel (and False) if none."""
    body, looped = loop_body(sass)
    return collections.Counter(op for op in map(_opcode, body) if op), looped


def steps_per_iteration(quant: str, fast: bool, m: int, cfg: tuple, k: int) -> int:
    """K steps one iteration of the kernel's loop covers: two in int4's fast M == 1 loop
    (kernels/gemv.py, _matmul_fast_runs, past FAST_UNROLL steps), else one."""
    steps = -(-k // cfg[2])
    return 2 if quant == "int4" and fast and m == 1 and steps > G.FAST_UNROLL else 1


def resources(cubin_path: str) -> tuple[int, int]:
    """(registers per thread, bytes of stack / local memory per thread: spills) of the cubin's kernel."""
    cuobjdump = os.path.join(BIN, "cuobjdump")
    out = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out)
    return int(m.group(1)), max(int(m.group(2)), int(m.group(3)))


def programs_per_sm(regs: int, num_warps: int, programs: int) -> int:
    """Programs resident on one H200 SM: the register file's (64K, allocated per warp in units of
    256) and 64 warps' bound, and no more than the grid spreads over its 132 SMs."""
    per_warp = -(-regs * 32 // 256) * 256
    fit = min((65536 // per_warp) // num_warps, 64 // num_warps, 32)
    return max(0, min(fit, -(-programs // SMS)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--entry", action="append", default=[],
                    help="BLOCK_N,BLOCK_K,num_warps: also count int4 g128 fast (and with zero points) and int8 fast "
                         "at this FAST_M1_CONFIGS candidate (repeatable)")
    ap.add_argument("--tile", action="append", default=[],
                    help="BLOCK_M,BLOCK_N,BLOCK_K,num_warps: also count int8's exact path at M = 16 with this "
                         "config in place of gemv_config's (repeatable)")
    args = ap.parse_args(argv)
    nvdisasm = os.path.join(BIN, "nvdisasm")
    variants = [(name, spec, None, None) for name, spec in VARIANTS.items()]
    for text in args.entry:
        entry = tuple(int(v) for v in text.split(","))
        variants += [(f"int4_g128_fast@{text}", VARIANTS["int4_g128_fast"], entry, None),
                     (f"int4_g128_zero_fast@{text}", VARIANTS["int4_g128_zero_fast"], entry, None),
                     (f"int8_fast@{text}", VARIANTS["int8_fast"], entry, None)]
    for text in args.tile:
        variants.append((f"int8_m16_exact@{text}", VARIANTS["int8_m16_exact"], None,
                         tuple(int(v) for v in text.split(","))))
    for name, (quant, fast, group, zero, m), entry, tile in variants:
        cubin, cfg = compile_sm90(quant, fast, group, zero, m, args.n, args.k, entry, tile=tile)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
            regs, spill = resources(f.name)
        body, looped = loop_body(sass)
        ops = collections.Counter(op for op in map(_opcode, body) if op)
        counted, kernel = load_stats(body), load_stats(sass_lines(sass))
        threads = cfg[3] * 32
        elem_bytes = {"int4": 0.5, "dense": 2.0}.get(quant, 1.0)
        steps = steps_per_iteration(quant, fast, m, cfg, args.k) if looped else -(-args.k // cfg[2])
        nbytes = cfg[1] * cfg[2] * elem_bytes * steps / threads  # weight bytes per thread counted
        total = sum(ops.values())
        resident = programs_per_sm(regs, cfg[3], -(-args.n // cfg[1]) * -(-m // cfg[0]))
        print(json.dumps({"variant": name, "config": list(cfg), "counted": "loop" if looped else "kernel",
                          "instructions": total, "weight_bytes_per_thread": nbytes,
                          "instructions_per_byte": round(total / nbytes, 2),
                          "conversions_per_byte": round(sum(ops[c] for c in CONVERSIONS) / nbytes, 2),
                          "ldg": counted["ldg"], "ldg_bytes": counted["ldg_bytes"],
                          "ldg_bytes_before_ffma": counted["ldg_bytes_before_ffma"],
                          "kernel_ldg_bytes_before_ffma": kernel["ldg_bytes_before_ffma"],
                          "regs": regs, "spill_bytes": spill, "programs_per_sm": resident,
                          "kernel_bytes_before_ffma_per_sm": resident * threads * kernel["ldg_bytes_before_ffma"],
                          "top": ops.most_common(8)}), flush=True)


if __name__ == "__main__":
    main()
