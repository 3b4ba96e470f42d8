"""Sweep kernels/gemv.py block sizes at decode shapes on the GPU: each config's kernel launched back to
back on distinct weight copies (256 MiB or more in all, so nothing is served from L2) inside a CUDA
graph, PDL as the engine launches it.

M == 1 (the default): prints read bandwidth per config, the best, and the heuristic's (gemv_config).
M > 1 (``--m 2 5 8``): per shape and M, the multi-row multiply-reduce at gemv_config's tile ("rows",
the default up to MR_MAX_M), the 16-row tl.dot tiles ("dot", gemv_config(..., mr=False), as before
it), bf16 cuBLAS (F.linear on the same weights, unfused: no norm, activation, residual or rotary) and
each ``--rows-tile`` candidate ("rows_tile"); one JSON object per line (us a launch, GB/s of weight
read) and a summary line per shape and M.

    python experiments/gemv_sweep.py --model llama2-7b
    python experiments/gemv_sweep.py --model llama2-7b --m 2 3 5 8 --rows-tile 1,8,1024,4 --rows-tile 1,8,512,2
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from eval.bench.common import graph_seconds
from kernels._triton import next_pow2
from kernels.gemv import MR_MAX_M, SMALL_M, gemv, gemv_config, gemv_rope_store, gemv_rope_store_config

MODELS = {  # hidden, intermediate, heads, kv heads, head dim
    "llama2-7b": (4096, 11008, 32, 32, 128),
    "tinyllama": (2048, 5632, 32, 4, 64),
    "smollm2-135m": (576, 1536, 9, 3, 64),
}


def cases(model: str):
    hidden, inter, heads, kv_heads, head_dim = MODELS[model]
    n_qkv = (heads + 2 * kv_heads) * head_dim
    yield "qkv+rope+store", n_qkv, hidden, "rope"
    yield "o_proj+residual", hidden, heads * head_dim, "residual"
    yield "gate_up+norm+swiglu", 2 * inter, hidden, "swiglu"
    yield "down+residual", hidden, inter, "residual"


def bench(kind: str, n: int, k: int, config, copies: int, head_dim: int, heads: int, kv_heads: int,
          m: int = 1, cublas: bool = False) -> float:
    """Seconds a launch: the fused kernel of ``kind`` at ``config`` on M rows, or (``cublas``)
    F.linear on the same weights."""
    dev, dt = "cuda", torch.bfloat16
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=dt)
    nw = torch.ones(k, device=dev, dtype=dt)
    if cublas:
        def run(w):
            F.linear(x, w)
    elif kind == "rope":
        cos = torch.randn(64, head_dim, device=dev)
        sin = torch.randn(64, head_dim, device=dev)
        kc = torch.zeros(64, 16, kv_heads, head_dim, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        pos = torch.arange(5, 5 + m, device=dev)
        slots = torch.arange(5, 5 + m, device=dev)

        def run(w):
            gemv_rope_store(x, w, norm_weight=nw, positions=pos, cos_table=cos, sin_table=sin, k_cache=kc,
                            v_cache=vc, slot_mapping=slots, num_heads=heads, num_kv_heads=kv_heads, config=config)
    elif kind == "swiglu":
        def run(w):
            gemv(x, w, norm_weight=nw, swiglu=True, config=config)
    else:
        res = torch.randn(m, n, device=dev, dtype=dt)

        def run(w):
            gemv(x, w, residual=res, out=res, config=config)
    for w in ws[:2]:
        run(w)
    seconds = graph_seconds(lambda: [run(w) for w in ws]) / copies
    del ws
    return seconds


def sweep_one_row(args, name: str, n: int, k: int, kind: str, heads: int, kv_heads: int, head_dim: int) -> None:
    """M == 1: every candidate tile of the multiply-reduce, the best and the heuristic's."""
    n_out = n // 2 if kind == "swiglu" else n
    default = (gemv_rope_store_config if kind == "rope" else gemv_config)(1, n_out if kind != "rope" else n, k)
    results = {}
    for block_n, block_k, warps in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (4, 8, 16)):
        if block_k > max(512, 2 * k) or not 512 <= block_n * block_k <= 16384 or block_n * block_k < 32 * warps * 4:
            continue
        cfg = (1, block_n, block_k, warps)
        try:
            results[cfg] = n * k * 2 / bench(kind, n, k, cfg, args.copies, head_dim, heads, kv_heads) / 1e12
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
            print(f"  {name} {cfg}: {type(e).__name__}")
    if default not in results:
        results[default] = n * k * 2 / bench(kind, n, k, default, args.copies, head_dim, heads, kv_heads) / 1e12
    best = sorted(results.items(), key=lambda kv: -kv[1])
    print(f"{args.model} {name} N={n} K={k} ({n * k * 2 / 1e6:.1f} MB): heuristic {default} "
          f"{results[default]:.2f} TB/s; best: " + ", ".join(f"{c[1:]} {v:.2f}" for c, v in best[:6]), flush=True)


def sweep_rows(args, m: int, name: str, n: int, k: int, kind: str, heads: int, kv_heads: int, head_dim: int) -> None:
    """M > 1: the multi-row multiply-reduce (heuristic tile and --rows-tile candidates), the 16-row
    tl.dot path and cuBLAS, one JSON line each."""
    n_out = n // 2 if kind == "swiglu" else n

    def config(mr: bool):
        if kind == "rope":
            return gemv_rope_store_config(m, n, k, mr=mr)
        return gemv_config(m, n_out, k, two=kind == "swiglu", mr=mr)

    paths = [("rows", config(True)), ("dot", config(False)), ("cublas", None)]
    if m <= MR_MAX_M:
        for text in args.rows_tile:  # BLOCK_M from M; BLOCK_N counts pairs for rope (as gemv_rope_store_config's)
            _, block_n, block_k, warps = (int(v) for v in text.split(","))
            paths.append(("rows_tile", (next_pow2(m), block_n, block_k, warps)))
    us = {}
    for path, cfg in paths:
        if path.startswith("rows") and cfg[0] > MR_MAX_M:
            continue  # past MR_MAX_M the heuristic is tl.dot's: timed as "dot"
        try:
            seconds = bench(kind, n, k, cfg, args.copies, head_dim, heads, kv_heads, m, cublas=path == "cublas")
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
            print(json.dumps({"model": args.model, "shape": name, "m": m, "path": path, "config": cfg,
                              "error": type(e).__name__}), flush=True)
            continue
        us[(path, cfg)] = seconds * 1e6
        print(json.dumps({"model": args.model, "shape": name, "n": n, "k": k, "m": m, "path": path,
                          "config": list(cfg) if cfg else None, "us": round(seconds * 1e6, 2),
                          "gbps": round(n * k * 2 / seconds / 1e9, 1)}), flush=True)
    print(f"{args.model} {name} N={n} K={k} M={m}: " + ", ".join(
        f"{path}{'' if cfg is None else list(cfg)} {t:.1f} us" for (path, cfg), t in us.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    ap.add_argument("--m", type=int, nargs="+", default=[1],
                    help=f"rows (1..{SMALL_M}): 1 sweeps the M == 1 tiles; more times rows / dot / cuBLAS")
    ap.add_argument("--rows-tile", action="append", default=[],
                    help="BLOCK_M,BLOCK_N,BLOCK_K,num_warps: also time the multi-row path at this tile (BLOCK_M is "
                         "taken from M; BLOCK_N counts rotary pairs on the qkv shape; repeatable)")
    args = ap.parse_args(argv)
    if any(not 1 <= m <= SMALL_M for m in args.m):
        ap.error(f"--m: rows in 1..{SMALL_M}, got {args.m}")
    _, _, heads, kv_heads, head_dim = MODELS[args.model]
    for m in args.m:
        for name, n, k, kind in cases(args.model):
            args.copies = max(16, -(-(256 << 20) // (n * k * 2)))  # 256 MiB in all: far more than L2
            if m == 1:
                sweep_one_row(args, name, n, k, kind, heads, kv_heads, head_dim)
            else:
                sweep_rows(args, m, name, n, k, kind, heads, kv_heads, head_dim)


if __name__ == "__main__":
    main()
