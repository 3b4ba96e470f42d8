"""Sweep kernels/gemv.py's block sizes for compressed weights (int8, int4 per group with and
without zero points, W8A8 int8) at Llama-2-7B's decode shapes on the GPU, as experiments/gemv_sweep.py
does for bf16: each config's kernel launched back to back on distinct weight copies (256 MiB or
more in all, so nothing is served from L2) inside a CUDA graph, PDL as the engine launches it.
Prints, per (format, shape, M), the heuristic's config (gemv_config) and the best ones with the
bytes they stream per second (codes + scales + zero points), and the copy-ceiling-relative figure
the issue asks for (int4 at M 1 >= 80%).

    python experiments/quant_gemv_sweep.py [--formats int8 int4_g128 ...] [--m 1 16] [--budget-s 110]

Each new (shape, config, format) is a Triton compile (about a second): the sweep stops trying
candidates when --budget-s is spent (heuristic first, then the candidates most likely to win)
and prints what it has, so a default run ends within two minutes.
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.bench.common import graph_seconds
from kernels._triton import next_pow2
from kernels.gemv import gemv, gemv_config

SHAPES = {  # Llama-2-7B decode linears: name -> (N, K, fusion as the engine runs it)
    "qkv": (3 * 4096, 4096, "norm"),
    "o_proj": (4096, 4096, "residual"),
    "gate_up": (2 * 11008, 4096, "swiglu"),
    "down": (4096, 11008, "residual"),
}
FORMATS = ["int8", "int4_g64", "int4_g128", "int4_g128_zero", "w8a8_int8"]


def candidates(m: int, k: int, group: int) -> list[tuple[int, int, int, int]]:
    """Configs to try, the likeliest first. M == 1: wider K steps (a quantized row is 1/2 or 1/4
    of bf16's bytes, so the same bytes in flight need 2-4x the elements) and more columns per
    program; M > 1: the 16-row tl.dot tiles with wider K steps."""
    if m == 1:
        first = [(4, 4096, 8), (8, 4096, 8), (16, 2048, 8), (8, 8192, 8), (2, 8192, 8), (16, 4096, 8),
                 (4, 8192, 8), (8, 2048, 4), (32, 1024, 8), (4, 2048, 4), (2, 4096, 4), (16, 4096, 16)]
        grid = first + [(bn, bk, w) for bk in (4096, 8192, 2048, 1024) for bn in (4, 8, 2, 16, 1) for w in (8, 4, 16)
                        if (bn, bk, w) not in first]
        out = [(1, bn, bk, w) for bn, bk, w in grid
               if bk <= max(1024, next_pow2(k)) and 2048 <= bn * bk <= 65536 and bn * bk >= 32 * w * 8]
    else:
        out = [(16, bn, bk, w) for bk in (256, 512, 128, 1024) for bn in (32, 16, 64) for w in (4, 8)
               if bk <= k]
    return [c for c in out if c[2] % group == 0 or c[2] < group]


def make_weights(fmt: str, n: int, k: int, copies: int,
                 dev: str = "cuda") -> tuple[list[tuple[torch.Tensor, dict]], int]:
    """`copies` distinct weights of the format, as gemv's (weight, quant kwargs); bytes of one."""
    out = []
    for _ in range(copies):
        if fmt in ("int8", "w8a8_int8"):
            codes = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
            scale = torch.rand(n, device=dev) * 1e-3 + 1e-4
            out.append((codes, {"quant": fmt, "scale": scale}))
        else:
            group = int(fmt.split("_g")[1].split("_")[0])
            packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
            scale = torch.rand(n, k // group, device=dev) * 1e-2 + 1e-3
            zero = torch.randint(-8, 8, (n, k // group), device=dev).float() if fmt.endswith("zero") else None
            out.append((packed, {"quant": "int4", "scale": scale, "zero": zero}))
    w, q = out[0]
    nbytes = w.numel() * w.element_size() + sum(t.numel() * t.element_size() for t in (q["scale"], q.get("zero"))
                                                if t is not None)
    return out, nbytes


def bench(weights, m: int, n: int, k: int, fusion: str, config) -> float:
    """Seconds per launch of gemv with `config`, over every weight copy in one CUDA graph."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    nw = torch.ones(k, device=dev, dtype=dt)
    res = torch.randn(m, n // 2 if fusion == "swiglu" else n, device=dev, dtype=dt)

    def run(w, q):
        if fusion == "swiglu":
            gemv(x, w, norm_weight=nw, swiglu=True, config=config, **q)
        elif fusion == "norm":
            gemv(x, w, norm_weight=nw, config=config, **q)
        else:
            gemv(x, w, residual=res, out=res, config=config, **q)

    # A config is timed only if it computes what the heuristic's does (summation order aside).
    fused = {"residual": res} if fusion == "residual" else {"norm_weight": nw}
    w, q = weights[0]
    got = gemv(x, w, swiglu=fusion == "swiglu", config=config, **fused, **q)
    want = gemv(x, w, swiglu=fusion == "swiglu", **fused, **q)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if not err < 1e-2:
        raise ValueError(f"config {config} differs from the heuristic's result: relative error {err:.3g}")
    for w, q in weights[:2]:
        run(w, q)
    return graph_seconds(lambda: [run(w, q) for w, q in weights]) / len(weights)


def copy_ceiling_tbps() -> float:
    """Device-to-device copy bandwidth (read + write) of 1 GiB, TB/s: the ceiling a GEMV's reads are held to."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=["int8", "int4_g128"], choices=FORMATS,
                    help="default: the two the issue's targets rest on; add int4_g64, int4_g128_zero, w8a8_int8")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1], help="batch rows (1..16), e.g. --m 1 16")
    ap.add_argument("--budget-s", type=float, default=110.0, help="stop trying new configs after this long")
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv_sweep needs a CUDA GPU")
    started = time.perf_counter()
    ceiling = copy_ceiling_tbps()
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling:.2f} TB/s", flush=True)
    # Round-robin over the cases so that a spent budget leaves every case with its best few tried.
    cases = []
    for fmt in args.formats:
        group = int(fmt.split("_g")[1].split("_")[0]) if fmt.startswith("int4") else 1
        for shape in args.shapes:
            n, k, fusion = SHAPES[shape]
            code_bytes = n * k if fmt in ("int8", "w8a8_int8") else n * k // 2
            copies = max(8, -(-(256 << 20) // code_bytes))  # 256 MiB in all: far more than L2
            weights, nbytes = make_weights(fmt, n, k, copies)
            for m in args.m:
                n_out = n // 2 if fusion == "swiglu" else n
                default = gemv_config(m, n_out, k, two=fusion == "swiglu")
                todo = [default] + [c for c in candidates(m, k, group) if c != default]
                cases.append({"fmt": fmt, "shape": shape, "m": m, "n": n, "k": k, "fusion": fusion,
                              "weights": weights, "bytes": nbytes, "default": default, "todo": todo, "results": {}})
    while any(c["todo"] for c in cases) and time.perf_counter() - started < args.budget_s:
        for case in cases:
            if not case["todo"] or time.perf_counter() - started >= args.budget_s:
                continue
            cfg = case["todo"].pop(0)
            try:
                case["results"][cfg] = bench(case["weights"], case["m"], case["n"], case["k"], case["fusion"], cfg)
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
                print(f"  {case['fmt']} {case['shape']} M={case['m']} {cfg}: {type(e).__name__}: {e}"[:300], flush=True)
    for case in cases:
        res = case["results"]
        if not res:
            print(f"{case['fmt']} {case['shape']} M={case['m']}: nothing timed within the budget")
            continue
        tbps = {cfg: case["bytes"] / s / 1e12 for cfg, s in res.items()}
        best = sorted(tbps.items(), key=lambda kv: -kv[1])
        d = case["default"]
        heuristic = f"{tbps[d]:.2f} TB/s ({tbps[d] / ceiling:.0%} of copy)" if d in tbps else "not timed"
        print(f"{case['fmt']} {case['shape']} N={case['n']} K={case['k']} M={case['m']} "
              f"({case['bytes'] / 1e6:.1f} MB, {len(res)} configs): heuristic {d} {heuristic}; best: "
              + ", ".join(f"{c} {v:.2f} TB/s ({v / ceiling:.0%})" for c, v in best[:args.top]), flush=True)
    print(f"swept in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
