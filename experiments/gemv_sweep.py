"""Sweep kernels/gemv.py block sizes at batch-1 decode shapes on the GPU: each config's kernel
launched back to back on distinct weight copies (256 MiB or more in all, so nothing is served from L2) inside a
CUDA graph, PDL as the engine launches it; prints read bandwidth per config, the best, and the
heuristic's (gemv_config).

    python experiments/gemv_sweep.py --model llama2-7b
"""

from __future__ import annotations

import argparse
import itertools

import torch

from eval.bench.common import graph_seconds
from kernels.gemv import gemv, gemv_config, gemv_rope_store, gemv_rope_store_config

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    args = ap.parse_args()
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
