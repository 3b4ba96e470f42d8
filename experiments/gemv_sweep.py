"""Sweep kernels/gemv.py block sizes at batch-1 decode shapes on the GPU: each config's kernel
launched back to back on distinct weight copies (256 MiB or more in all, so nothing is served from L2) inside a
CUDA graph, PDL as the engine launches it; prints read bandwidth per config, the best, and the
heuristic's (gemv_config).

    python experiments/gemv_sweep.py --model llama2-7b
    python experiments/gemv_sweep.py --model llama2-7b --m 2 8 16 --json rows.jsonl
    python experiments/gemv_sweep.py --model smollm2-135m --m 2 5 16 --formats dense --wide --json wide.jsonl

With --m (rows > 1, the 16-row tl.dot tiles) it times, per shape and config, the fused kernel as the
engine runs it against the same kernel on an input the Triton RMSNorm kernel normalised first (two
launches, "prenorm"), and cuBLAS's F.linear alone, for bf16 and int8 weights. Where gemv launches the
norm apart itself (kernels/gemv.py separate_norm: large weights, such as the 7B's) the two are one
path and only "fused" is timed; the 7B's prologue was timed against it at 0f33bc5
(benchmarks/2026-11-30-h200x2-s16/g0/rows.jsonl).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from eval.bench.common import graph_seconds
from kernels.gemv import gemv, gemv_config, gemv_rope_store, gemv_rope_store_config, separate_norm
from kernels.rmsnorm import rmsnorm

DEVICE = "cuda"
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


def bench(kind: str, n: int, k: int, config, copies: int, head_dim: int, heads: int, kv_heads: int) -> float:
    dev, dt = "cuda", torch.bfloat16
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=dt)
    nw = torch.ones(k, device=dev, dtype=dt)
    if kind == "rope":
        cos = torch.randn(64, head_dim, device=dev)
        sin = torch.randn(64, head_dim, device=dev)
        kc = torch.zeros(64, 16, kv_heads, head_dim, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        pos = torch.tensor([5], device=dev)
        slots = torch.tensor([5], device=dev)

        def run(w):
            gemv_rope_store(x, w, norm_weight=nw, positions=pos, cos_table=cos, sin_table=sin, k_cache=kc,
                            v_cache=vc, slot_mapping=slots, num_heads=heads, num_kv_heads=kv_heads, config=config)
    elif kind == "swiglu":
        def run(w):
            gemv(x, w, norm_weight=nw, swiglu=True, config=config)
    else:
        res = torch.randn(1, n, device=dev, dtype=dt)

        def run(w):
            gemv(x, w, residual=res, out=res, config=config)
    for w in ws[:2]:
        run(w)
    seconds = graph_seconds(lambda: [run(w) for w in ws]) / copies
    del ws
    return n * k * 2 / seconds / 1e12


def rows_variants(kind: str, m: int, n: int, k: int, quant: str, copies: int, model: str, wide: bool = False):
    """(weight copies [(codes, scale)], [(variant, config, run over one copy)]) of one shape at m rows:
    the fused kernel with its norm prologue ("fused") or on an input normalised by a separate launch
    ("prenorm"), each at the heuristic config (first) and the swept ones, and F.linear on a bf16 weight
    ("cublas", no epilogue). ``wide`` (--wide, for latency-bound shapes such as SmolLM2's, where a
    program's serial K steps are the time): the fused kernel alone, also with 1024-wide K steps
    (one step over K 576) and split-K (``fused_splitS``: S programs a tile, one K step or more each)."""
    _, _, heads, kv_heads, head_dim = MODELS[model]
    dev, dt = DEVICE, torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    nw = torch.rand(k, device=dev, dtype=dt) + 0.5
    if quant == "int8":
        ws = [(torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8),
               torch.rand(n, device=dev) * 1e-3 + 1e-4) for _ in range(copies)]
    else:
        ws = [(torch.randn(n, k, device=dev, dtype=dt) * 0.02, None) for _ in range(copies)]
    n_out = n // 2 if kind == "swiglu" else n
    if kind == "rope":
        cos, sin = torch.randn(64, head_dim, device=dev), torch.randn(64, head_dim, device=dev)
        kc = torch.zeros(64, 16, kv_heads, head_dim, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        pos = torch.arange(m, device=dev) + 3
        slots = torch.arange(m, device=dev) + 3
        default = gemv_rope_store_config(m, n, k)

        def one(xin, w, s, norm, config, split=1):
            gemv_rope_store(xin, w, norm_weight=norm, positions=pos, cos_table=cos, sin_table=sin, k_cache=kc,
                            v_cache=vc, slot_mapping=slots, num_heads=heads, num_kv_heads=kv_heads,
                            config=config, quant=quant, scale=s)
    else:
        res = torch.randn(m, n_out, device=dev, dtype=dt)
        default = gemv_config(m, n_out, k, two=kind == "swiglu")

        def one(xin, w, s, norm, config, split=1):
            if kind == "swiglu":
                gemv(xin, w, norm_weight=norm, swiglu=True, config=config, quant=quant, scale=s, split_k=split)
            else:
                gemv(xin, w, residual=res, out=res, config=config, quant=quant, scale=s, split_k=split)
    norm = kind in ("rope", "swiglu")
    prenorm = norm and not separate_norm(m, ws[0][0], False)  # else gemv normalises apart already
    variants = []
    if wide:
        swept = [(16, bn, bk, 4) for bn, bk in itertools.product((16, 32), (128, 256, 512, 1024))]
        swept += [(16, 16, 1024, 8), (16, 32, 512, 8)]
    else:
        swept = [(16, bn, bk, 4) for bn, bk in itertools.product((16, 32, 64), (128, 256, 512))]
        swept += [(16, 32, 256, 8), (16, 64, 256, 8)]
    configs = [default] + [c for c in swept if c != default]
    for config in configs:
        variants.append(("fused", config, lambda w, s, c=config: one(x, w, s, nw if norm else None, c)))
        # gemv_rope_store has no split-K; a split is timed only where each program keeps a K step
        for split in range(2, 5) if wide and kind != "rope" else ():
            if split <= -(-k // config[2]):
                variants.append((f"fused_split{split}", config,
                                 lambda w, s, c=config, sp=split: one(x, w, s, nw if norm else None, c, sp)))
        if prenorm and not wide:
            variants.append(("prenorm", config, lambda w, s, c=config: one(rmsnorm(x, nw, 1e-6), w, s, None, c)))
    if quant == "dense":
        variants.append(("cublas", None, lambda w, s: torch.nn.functional.linear(x, w)))
    return ws, variants


def sweep_rows(args) -> None:
    """--m: the rows sweep (module docstring), one JSON line per (shape, format, m, variant, config)."""
    out = open(args.json, "a") if args.json else None
    for name, n, k, kind in cases(args.model):
        for quant in args.formats:
            for m in args.m:
                copies = max(8, -(-(256 << 20) // (n * k * (1 if quant == "int8" else 2))))
                ws, variants = rows_variants(kind, m, n, k, quant, copies, args.model, args.wide)
                best: dict[str, tuple[float, object]] = {}
                for variant, config, run in variants:
                    try:
                        for w, s in ws[:2]:
                            run(w, s)
                        us = graph_seconds(lambda: [run(w, s) for w, s in ws]) / len(ws) * 1e6
                    except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
                        print(f"  {name} {quant} m={m} {variant} {config}: {type(e).__name__}", flush=True)
                        continue
                    row = {"model": args.model, "shape": name, "n": n, "k": k, "quant": quant, "m": m,
                           "variant": variant, "config": config, "us": us,
                           "default": config == variants[0][1]}
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                    if variant not in best or us < best[variant][0]:
                        best[variant] = (us, config)
                    if row["default"]:
                        best[variant + "@default"] = (us, config)
                print(f"{args.model} {name} {quant} m={m}: " + ", ".join(
                    f"{v} {u:.1f} us {c[1:] if c else ''}" for v, (u, c) in sorted(best.items())), flush=True)
                del ws, variants
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    ap.add_argument("--m", type=int, nargs="*", default=None, help="rows > 1: the rows sweep (module docstring)")
    ap.add_argument("--formats", nargs="*", default=["dense", "int8"], choices=["dense", "int8"])
    ap.add_argument("--json", default=None, help="append the rows sweep's measurements here")
    ap.add_argument("--wide", action="store_true", help="rows sweep: 1024-wide K steps and split-K (rows_variants)")
    args = ap.parse_args()
    if args.m:
        if min(args.m) < 2 or max(args.m) > 16:
            ap.error(f"--m takes rows from 2 to 16 (the tl.dot tiles), got {args.m}")
        return sweep_rows(args)
    _, _, heads, kv_heads, head_dim = MODELS[args.model]
    for name, n, k, kind in cases(args.model):
        args.copies = max(16, -(-(256 << 20) // (n * k * 2)))  # 256 MiB in all: far more than L2
        n_out = n // 2 if kind == "swiglu" else n
        default = (gemv_rope_store_config if kind == "rope" else gemv_config)(1, n_out if kind != "rope" else n, k)
        results = {}
        for block_n, block_k, warps in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (4, 8, 16)):
            if block_k > max(512, 2 * k) or not 512 <= block_n * block_k <= 16384 or block_n * block_k < 32 * warps * 4:
                continue
            cfg = (1, block_n, block_k, warps)
            try:
                results[cfg] = bench(kind, n, k, cfg, args.copies, head_dim, heads, kv_heads)
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
                print(f"  {name} {cfg}: {type(e).__name__}")
        if default not in results:
            results[default] = bench(kind, n, k, default, args.copies, head_dim, heads, kv_heads)
        best = sorted(results.items(), key=lambda kv: -kv[1])
        print(f"{args.model} {name} N={n} K={k} ({n * k * 2 / 1e6:.1f} MB): heuristic {default} "
              f"{results[default]:.2f} TB/s; best: " + ", ".join(f"{c[1:]} {v:.2f}" for c, v in best[:6]), flush=True)


if __name__ == "__main__":
    main()
