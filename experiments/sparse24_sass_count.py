"""SASS instructions of kernels/quant_gemv.py's M == 1 2:4 + int4 GEMVs ("select" and "fast") per
weight byte, compiled for sm_90 with Triton's bundled ptxas (no GPU needed), as
experiments/gemv_sass_count.py counts kernels/gemv.py's: the K loop's body per thread, divided by
the bytes a thread's rows hold over the K the loop covers, counted two ways: "actual" (kept codes +
2-bit positions: 0.375 bytes a dense input) and "dense_equivalent" (int4's 0.5 bytes a dense input,
the bytes kernels/gemv.py's fast int4 path reads for the same weight: its 8.4 compares with this),
and per dense input. Scales are left out of both byte counts, as gemv_sass_count leaves them out.
The fast kernel also with the fused decode's prologue / epilogues (FUSIONS, "rope_store").

    python experiments/sparse24_sass_count.py [--n 4096] [--k 4096] [--entry 8,4096,4 ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from experiments.gemv_sass_count import BIN, CONVERSIONS, _opcode, load_stats, loop_body, programs_per_sm, resources
from kernels import quant_gemv as Q

# The fast kernel's variants: unfused, and the fused decode's (gemv_weight): qkv / gate_up with the norm
# prologue (gate_up with SwiGLU: two row sets a program), o_proj / down with the residual add; all
# fused launches with PDL. "rope_store" is the qkv launch with rotary + KV store (two row sets).
FUSIONS = {path: {"NORM": norm, "SWIGLU": swiglu, "RESIDUAL": res, "PDL": path != "fast"}
           for path, norm, swiglu, res in [("fast", False, False, False), ("fast_norm", True, False, False),
                                           ("fast_norm_swiglu", True, True, False),
                                           ("fast_residual", False, False, True)]}
FAST_SIG = {"x_ptr": "*bf16", "xw_ptr": "*i32", "w_ptr": "*i32", "m_ptr": "*i16", "s_ptr": "*fp32", "z_ptr": "*fp32",
            "b_ptr": "*bf16", "nw_ptr": "*bf16"}
ACTUAL_BYTES = 0.375  # a dense input's share of kept codes (0.25) and positions (0.125)
DENSE_BYTES = 0.5  # int4's code bytes per input
GROUP = 128


def compile_sm90(path: str, n: int, k: int, entry: tuple[int, int, int], zero: bool) -> bytes:
    """The cubin of the path's kernel (bf16 x, int4 g128 codes, bias) and its launch constants,
    specialized as a launch on torch tensors is (pointers 16-byte aligned)."""
    block_n, block_k, warps = entry
    flags = dict(GROUP=GROUP, HAS_ZERO=zero, HAS_BIAS=True, BF16_BY_HAND=False, FP16=False)
    if path == "rope_store":  # the fused qkv launch: norm prologue, two row sets (rotary pairs), PDL
        kernel = Q._sparse24_rope_store_kernel
        sig = {**FAST_SIG, "q_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
               "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "slot_ptr": "*i64", "eps": "fp32",
               "cos_stride": "i32", "sin_stride": "i32"}
        constexprs = dict(K=k, Q_HEADS=32, KV_HEADS=32, HALF=64, BLOCK_N=block_n, BLOCK_K=block_k, NORM=True,
                          PDL=True, **flags)
    elif path.startswith("fast"):
        kernel = Q._sparse24_int4_fast_kernel
        sig = {**FAST_SIG, "res_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "eps": "fp32"}
        constexprs = dict(K=k, BLOCK_N=block_n, BLOCK_K=block_k, **flags, **FUSIONS[path])
    else:
        kernel = Q._sparse24_select_kernel
        sig = {"x_ptr": "*i64", "kept_ptr": "*i32", "meta_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32",
               "b_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32"}
        constexprs = dict(BLOCK_N=block_n, BLOCK_U=block_k // Q.UNIT, INT4=True, X_WORDS=True, **flags)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items()
             if ty.startswith("*") or ty == "i32"}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return compiled.asm["cubin"]


def count(path: str, n: int, k: int, entry: tuple[int, int, int], zero: bool) -> dict:
    cubin = compile_sm90(path, n, k, entry, zero)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        regs, spill = resources(f.name)
    body, looped = loop_body(sass)
    ops = collections.Counter(op for op in map(_opcode, body) if op)
    total = sum(ops.values())
    threads = entry[2] * 32
    steps = -(-k // entry[1])
    # the fast kernel's loop covers two K steps an iteration; a kernel without a loop all of them
    per_count = (1 if path == "select" else 2) if looped else steps
    row_sets = 2 if path in ("fast_norm_swiglu", "rope_store") else 1  # a program's rows: BLOCK_N a set
    dense = row_sets * entry[0] * entry[1] * per_count / threads  # dense inputs per thread in the counted code
    loads = load_stats(body)
    return {"path": path, "zero": zero, "config": list(entry), "counted": "loop" if looped else "kernel",
            "instructions": total, "dense_inputs_per_thread": dense,
            "per_dense_input": round(total / dense, 2),
            "per_byte_actual": round(total / (dense * ACTUAL_BYTES), 2),
            "per_byte_dense_equivalent": round(total / (dense * DENSE_BYTES), 2),
            "conversions": sum(ops[c] for c in CONVERSIONS), "ldg": loads["ldg"], "ldg_bytes": loads["ldg_bytes"],
            "regs": regs, "spill_bytes": spill,
            "programs_per_sm": programs_per_sm(regs, entry[2], -(-n // entry[0])), "top": ops.most_common(10)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--entry", action="append", default=[], help="BLOCK_N,BLOCK_K,num_warps of the fast path")
    args = ap.parse_args(argv)
    half = (Q.FAST_CONFIG[0] // 2, *Q.FAST_CONFIG[1:])  # two row sets: half the columns (_fast_config)
    runs = [("select", Q.SELECT_CONFIG), ("fast", Q.FAST_CONFIG), ("fast_norm", Q.FAST_CONFIG),
            ("fast_residual", Q.FAST_CONFIG), ("fast_norm_swiglu", half), ("rope_store", half)]
    runs += [("fast", tuple(int(v) for v in e.split(","))) for e in args.entry]
    for path, entry in runs:
        for zero in (False, True):
            print(json.dumps(count(path, args.n, args.k, entry, zero)), flush=True)


if __name__ == "__main__":
    main()
