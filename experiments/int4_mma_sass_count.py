"""SASS instructions per weight byte of kernels/int4_mma.py's K loop, compiled for sm_90 with
Triton's bundled ptxas (no GPU needed), beside what experiments/gemv_sass_count.py counts for the
CUDA-core GEMV (8.4 instr/byte at its best config; ~7.9 can issue per byte at the copy ceiling).
The largest backward-branch loop is counted per thread and divided by the weight bytes (codes)
a thread reads per iteration (BLOCK_N * BLOCK_K / 2 / threads, times the iterations the loop
body covers when the compiler unrolled it); a kernel whose K loop is fully unrolled is counted
whole over all its steps instead. The sparse24_int4_* formats count the same kernel with SPARSE24
(kernels/sparse24_mma.py: 2:4 + int4), its weight bytes the kept codes and positions (0.375 a
dense input, BYTES_PER_INPUT); "instructions_per_input" (per dense input) compares the two. HMMA/HGMMA (tensor-core) instructions are listed apart, and
the shared-memory bytes moved per weight byte ("smem_bytes_per_byte": an SM moves 128 B a clock,
~8 B per weight byte at the copy ceiling's 16 weight bytes an SM a clock).

    python experiments/int4_mma_sass_count.py [--n 4096] [--k 4096] [--m 16] [--config 64,256,8,4,3 ...]
        [--formats int4_g128 sparse24_int4_g128 ...]
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

from experiments.gemv_sass_count import (BIN, CONVERSIONS, _opcode, ldg_bytes, load_stats, loop_body, programs_per_sm,
                                         resources, sass_lines)
from kernels import int4_mma as Q

# format -> (group, zero points, 2:4): kernels/sparse24_mma.py's formats run the same kernel with SPARSE24
FORMATS = {"int4_g128": (128, False, False), "int4_g64": (64, False, False), "int4_g128_zero": (128, True, False),
           "int4_g32": (32, False, False), "sparse24_int4_g128": (128, False, True),
           "sparse24_int4_g64": (64, False, True), "sparse24_int4_g128_zero": (128, True, True),
           "sparse24_int4_g32": (32, False, True)}
# weight bytes per dense input: int4 codes 0.5; 2:4 kept codes 0.25 + positions 0.125 (scales left out of both)
BYTES_PER_INPUT = {False: 0.5, True: 0.375}
TENSOR_OPS = ("HMMA", "HGMMA")


def compile_sm90(group: int, zero: bool, m: int, n: int, k: int, config: tuple, dtype: str = "bf16",
                 bias: bool = False, sparse24: bool = False) -> bytes:
    """The cubin of _int4_mma_kernel at this shape and config, specialized as a launch on torch
    tensors is (16-byte aligned pointers, the row strides multiples of 16)."""
    block_n, block_k, split, num_warps, num_stages = config
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)
    sig = {"x_ptr": f"*{dtype}", "w_ptr": "*i16" if sparse24 else "*i32", "m_ptr": "*u8" if sparse24 else "*i32", "s_ptr": "*fp32",
           "z_ptr": "*fp32" if sparse24 else "*i32", "b_ptr": f"*{dtype}",
           "out_ptr": f"*{dtype}", "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "x_stride": "i32",
           "out_stride": "i32"}
    constexprs = dict(N=n, K=k, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, K_SPLIT=k_split,
                      HAS_ZERO=zero, HAS_BIAS=bias, BY_HAND=False, SPARSE24=sparse24)
    sig.update({name: "constexpr" for name in constexprs})
    ints = {"x_stride": k, "out_stride": n}
    aligned = [name for name, ty in sig.items() if ty.startswith("*") or ints.get(name, 1) % 16 == 0]
    attrs = {(Q._int4_mma_kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(Q._int4_mma_kernel, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.asm["cubin"]


def _sass(cubin: bytes) -> tuple[str, int, int]:
    """(SASS text, registers, spill bytes) of a cubin."""
    nvdisasm = os.path.join(BIN, "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        regs, spill = resources(f.name)
    return sass, regs, spill


def smem_bytes(body: list[str]) -> int:
    """Shared-memory bytes one thread moves in ``body``: STS / LDS by width, LDSM (.4: four 32-bit
    registers), cp.async (LDGSTS) writes, and the x operand an HGMMA m64nNk16 reads from shared
    memory (k16 x N bf16 a warpgroup: 16 * N * 2 / 128 bytes a thread)."""
    total = 0
    for line in body:
        op = _opcode(line, full=True)
        if op is None:
            continue
        base, mods = op.split(".")[0], op.split(".")[1:]
        if base in ("STS", "LDS", "LDGSTS"):
            total += ldg_bytes(op)  # the same width modifiers as a global load's
        elif base == "LDSM":
            total += 4 * int(mods[-1]) if mods and mods[-1].isdigit() else 4
        elif base == "HGMMA":  # HGMMA.64x16x16.F32.BF16 (the shape is lower case: not in the opcode match)
            n = int(re.search(r"HGMMA\.\d+x(\d+)x\d+", line).group(1))
            total += 16 * n * 2 // 128
    return total


def tensor_ops(ops: collections.Counter) -> int:
    return sum(ops[t] for t in TENSOR_OPS)


def count(fmt: str, m: int, n: int, k: int, config: tuple) -> dict:
    """The K loop's counts at this config. The steps its body covers (ptxas may unroll, and a
    layout may replicate work across warps) are its tensor-core instructions over those of one
    step, counted on a compile of the same config whose programs take exactly one K step."""
    group, zero, sparse24 = FORMATS[fmt]
    block_n, block_k, split, num_warps, _ = config
    sass, regs, spill = _sass(compile_sm90(group, zero, m, n, k, config, sparse24=sparse24))
    one_step, _, _ = _sass(compile_sm90(group, zero, m, n, block_k, (*config[:2], 1, *config[3:]), sparse24=sparse24))
    per_step = tensor_ops(collections.Counter(op for op in map(_opcode, sass_lines(one_step)) if op))
    body, looped = loop_body(sass)
    ops = collections.Counter(op for op in map(_opcode, body) if op)
    threads = num_warps * 32
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    steps = tensor_ops(ops) / per_step if looped else k_split // block_k
    inputs = block_n * block_k / threads * steps  # dense inputs per thread the body covers
    nbytes = inputs * BYTES_PER_INPUT[sparse24]  # weight bytes (codes; 2:4: kept codes + positions)
    total = sum(ops.values())
    programs = triton.cdiv(n, block_n) * triton.cdiv(k, k_split)
    return {"format": fmt, "M": m, "N": n, "K": k, "config": list(config), "counted": "loop" if looped else "kernel",
            "steps_counted": steps, "instructions": total, "weight_bytes_per_thread": nbytes,
            "instructions_per_byte": round(total / nbytes, 2), "instructions_per_input": round(total / inputs, 2),
            "tensor_ops_per_byte": round(tensor_ops(ops) / nbytes, 3),
            "conversions_per_byte": round(sum(ops[c] for c in CONVERSIONS) / nbytes, 2),
            "smem_bytes_per_byte": round(smem_bytes(body) / nbytes, 2),
            "ldg": load_stats(body)["ldg"], "regs": regs, "spill_bytes": spill, "programs": programs,
            "programs_per_sm": programs_per_sm(regs, num_warps, programs), "top": ops.most_common(12)}


CONFIGS = [(128, 256, 8, 4, 3), (128, 256, 8, 4, 1), (128, 512, 4, 4, 1), (64, 512, 4, 4, 1), (64, 256, 8, 4, 1),
           (64, 256, 8, 4, 3)]  # kernels/int4_mma.py's docstring table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--formats", nargs="+", default=["int4_g128", "int4_g64", "int4_g128_zero"], choices=list(FORMATS))
    ap.add_argument("--config", action="append", default=[], help="BLOCK_N,BLOCK_K,SPLIT_K,num_warps,num_stages")
    args = ap.parse_args(argv)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config] or CONFIGS
    for fmt in args.formats:
        for config in configs:
            try:
                rec = count(fmt, args.m, args.n, args.k, config)
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result too
                rec = {"format": fmt, "config": list(config), "error": f"{type(e).__name__}: {e}"[:300]}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
