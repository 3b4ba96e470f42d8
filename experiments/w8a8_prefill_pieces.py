"""W8A8 prefill linears at Llama-2-7B's shapes, piece by piece, against bf16 F.linear: what
kernels/w8a8.py's docstring counts on paper, measured. For each linear (qkv, o_proj, gate_up,
down) and M (default 1024, 4080, 8192 tokens):

- bf16: F.linear (cuBLAS);
- int8_torch (W8A8Linear without Triton, the path before issue 13's fix): torch quantization,
  torch._int_mm, torch dequant epilogue; int8_triton (use_triton, the engine's path now): the
  quantize kernel, then int8_mm (dequant + bias fused); int8_mm alone beside torch._int_mm alone
  on the same codes (is our Triton GEMM or cuBLASLt's faster at the 8-bit GEMM itself?);
- fp8_torch: torch quantization + torch._scaled_mm (row-wise); fp8_triton: the quantize kernel +
  torch._scaled_mm.

Times are triton.testing.do_bench medians (L2 flushed between runs), in us; memory-bound pieces
carry GB/s of the bytes the docstring counts, GEMMs TFLOP/s. --sweep times int8_mm over
SWEEP_CONFIGS per (linear, M) and names the best (to set kernels/w8a8.py's INT8_MM_TILES);
--m 32 64 128 256 compares int8_mm with torch._int_mm at decode batches (INT8_MM_MIN_ROWS: below
it, int8_triton's total is the _int_mm route; the "linear" record names the route).
One JSON object per line (stdout and --json): {"kind": "piece"} per (linear, M, path, piece),
{"kind": "linear"} per (linear, M) with each path's total and its speedup over bf16,
{"kind": "int8_mm_config"} per swept config, {"kind": "model_linears"} per M (the 32 layers'
linears per path, ms: against eval.bench.quant's end-to-end prefill, what is left outside them),
{"kind": "done"}.

    python experiments/w8a8_prefill_pieces.py --json w8a8_pieces.jsonl [--m 1024 4080 8192] [--sweep]
    python experiments/w8a8_prefill_pieces.py --dry-run   # CPU, interpreted: small shapes, paths checked, no timing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch.nn.functional as F  # noqa: E402

from engine.layers.options import ModelOptions  # noqa: E402
from engine.layers.quantized import W8A8Linear, int_mm_rows  # noqa: E402
from eval.bench.quant import emit  # noqa: E402
from kernels import quant as ref  # noqa: E402
from kernels.w8a8 import INT8_MM_MIN_ROWS, INT8_MM_TILES, int8_mm, quantize_per_token  # noqa: E402

LINEARS = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
LAYERS = 32  # Llama-2-7B's decoder layers
DRY_LINEARS = {"qkv": (96, 64), "gate_up": (176, 64), "down": (64, 112)}
SWEEP_CONFIGS = list(INT8_MM_TILES) + [(128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3),
                                       (64, 256, 128, 8, 4, 4), (128, 128, 64, 8, 4, 5), (128, 256, 128, 8, 8, 4)]
DRY_SWEEP = [(16, 32, 32, 2, 4, 1), (32, 16, 16, 4, 4, 1)]


def bench_us(fn: Callable[[], Any], dry_run: bool) -> float | None:
    if dry_run:
        fn()
        return None
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def weights(n: int, k: int, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """int8 and fp8 codes [N, K] with per-channel scales, of one random weight."""
    w = torch.randn(n, k, device=device) * 0.02
    s8 = w.abs().amax(1) / 127.0
    sf = w.abs().amax(1) / 448.0
    return {"int8": (torch.round(w / s8[:, None]).clamp(-128, 127).to(torch.int8), s8),
            "fp8": ((w / sf[:, None]).to(torch.float8_e4m3fn), sf), "bf16": (w.to(torch.bfloat16), None)}


def torch_epilogue(acc: torch.Tensor, xs: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W8A8Linear._tensor_core's int8 dequantization, as it runs without Triton."""
    return (acc.float() * xs * scale[None, :]).to(dtype)


def pieces(name: str, n: int, k: int, m: int, device: str, dry_run: bool, out) -> dict[str, float | None]:
    """Times each path's pieces of one linear at m rows; returns each path's total (us)."""
    dtype = torch.bfloat16
    w = weights(n, k, device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    flop = 2.0 * m * n * k
    mk, mn, nk = m * k, m * n, n * k
    totals: dict[str, float | None] = {}

    def piece(path: str, what: str, fn: Callable[[], Any], nbytes: int | None = None, gemm: bool = False) -> None:
        us = bench_us(fn, dry_run)
        rec: dict[str, Any] = {"kind": "piece", "linear": name, "m": m, "n": n, "k": k, "path": path, "piece": what,
                               "us": us}
        if us is not None and nbytes is not None:
            rec.update(bytes=nbytes, GBps=nbytes / us / 1e3)
        if us is not None and gemm:
            rec["TFLOPs"] = flop / us / 1e6
        if what == "total":
            totals[path] = us
        emit(rec, out)

    piece("bf16", "total", lambda: F.linear(x, w["bf16"][0]), 2 * (mk + nk + mn), gemm=True)
    for act in ("int8", "fp8"):
        codes, scale = w[act]
        fast = W8A8Linear(codes, scale, act, options=ModelOptions(use_triton=True))
        xq, xs = quantize_per_token(x, act)
        want_q, want_s = (ref.quantize_per_token_int8 if act == "int8" else ref.quantize_per_token_fp8)(x)
        if not (torch.equal(xq.float(), want_q.float()) and torch.equal(xs, want_s)):
            raise AssertionError(f"{name} M={m}: quantize_per_token({act}) differs from the torch reference")
        want = ref.w8a8_linear_ref(x, codes, scale, act).float()
        checks = {f"{act}_triton": fast(x)}
        if act == "int8":
            checks["int8_mm"] = int8_mm(xq, xs, codes, scale, None, dtype)
        for what, got in checks.items():
            err = ((got.float() - want).norm() / want.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"{name} M={m} {what}: relative error {err:.3g} against w8a8_linear_ref")
        if act == "int8":
            piece("int8_triton", "quant", lambda: quantize_per_token(x, "int8"), 3 * mk + 4 * m)
            piece("int8_triton", "int8_mm", lambda: int8_mm(xq, xs, codes, scale, None, dtype), mk + nk + 2 * mn,
                  gemm=True)
            piece("int8_triton", "total", lambda: fast(x), None, gemm=True)
            piece("int8_torch", "quant", lambda: ref.quantize_per_token_int8(x), 47 * mk)
            if device == "cuda":
                padded = torch.nn.functional.pad(xq, (0, 0, 0, int_mm_rows(m) - m))
                acc = torch._int_mm(padded, codes.t())[:m]
                piece("int8_torch", "_int_mm", lambda: torch._int_mm(padded, codes.t()), mk + nk + 4 * mn, gemm=True)
                piece("int8_torch", "epilogue", lambda: torch_epilogue(acc, xs, scale, dtype), 30 * mn)
                slow = W8A8Linear(codes, scale, act, options=ModelOptions(use_triton=False))
                piece("int8_torch", "total", lambda: slow(x), None, gemm=True)
        else:
            piece("fp8_triton", "quant", lambda: quantize_per_token(x, "fp8", rows=-(-m // 16) * 16), 3 * mk + 4 * m)
            piece("fp8_triton", "total", lambda: fast(x), None, gemm=True)
            piece("fp8_torch", "quant", lambda: ref.quantize_per_token_fp8(x), 39 * mk)
            if device == "cuda":
                padded, sp = quantize_per_token(x, "fp8", rows=-(-m // 16) * 16)
                piece("fp8_torch", "_scaled_mm", lambda: torch._scaled_mm(
                    padded, codes.t(), scale_a=sp, scale_b=scale.view(1, n), out_dtype=dtype),
                    mk + nk + 2 * mn, gemm=True)
                slow = W8A8Linear(codes, scale, act, options=ModelOptions(use_triton=False))
                piece("fp8_torch", "total", lambda: slow(x), None, gemm=True)
    base = totals["bf16"]
    emit({"kind": "linear", "linear": name, "m": m, "n": n, "k": k, "us": totals,
          "int8_route": "int8_mm" if m >= INT8_MM_MIN_ROWS else "_int_mm",
          "vs_bf16": {p: (base / t if base and t else None) for p, t in totals.items()}}, out)
    return totals


def model_linears(m: int, per_linear: dict[str, dict[str, float | None]], layers: int, out) -> None:
    """The decoder linears of the whole model at m tokens, per path (ms): what the end-to-end
    prefill spends in them, and so the most any path can gain there (the rest, attention and the
    norms, is the same for all)."""
    paths = set.intersection(*(set(t) for t in per_linear.values()))
    ms = {p: (layers * sum(t[p] for t in per_linear.values()) / 1e3
              if all(t[p] is not None for t in per_linear.values()) else None) for p in sorted(paths)}
    base = ms.get("bf16")
    emit({"kind": "model_linears", "m": m, "layers": layers, "linears": sorted(per_linear), "ms": ms,
          "vs_bf16": {p: (base / t if base and t else None) for p, t in ms.items()}}, out)


def sweep(name: str, n: int, k: int, m: int, device: str, dry_run: bool, out) -> None:
    codes, scale = weights(n, k, device)["int8"]
    xq, xs = quantize_per_token(torch.randn(m, k, device=device, dtype=torch.bfloat16), "int8")
    want = int8_mm(xq, xs, codes, scale, None, torch.bfloat16)
    best: tuple[float, tuple] | None = None
    for config in (DRY_SWEEP if dry_run else SWEEP_CONFIGS):
        rec: dict[str, Any] = {"kind": "int8_mm_config", "linear": name, "m": m, "n": n, "k": k, "config": config}
        try:
            if not torch.equal(int8_mm(xq, xs, codes, scale, None, torch.bfloat16, config), want):
                raise AssertionError("differs from the default config's result")
            rec["us"] = bench_us(lambda: int8_mm(xq, xs, codes, scale, None, torch.bfloat16, config), dry_run)
            if rec["us"] is not None:
                rec["TFLOPs"] = 2.0 * m * n * k / rec["us"] / 1e6
                best = min(best or (rec["us"], config), (rec["us"], config))
        except Exception as e:  # a config that does not fit (shared memory) is recorded, the rest still run
            rec["error"] = repr(e)
        emit(rec, out)
    if best is not None:
        emit({"kind": "int8_mm_best", "linear": name, "m": m, "config": best[1], "us": best[0]}, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also append the records to this file")
    ap.add_argument("--m", type=int, nargs="+", default=[1024, 4080, 8192])
    ap.add_argument("--linears", nargs="+", choices=sorted(LINEARS), default=list(LINEARS))
    ap.add_argument("--sweep", action="store_true", help="time int8_mm over SWEEP_CONFIGS too")
    ap.add_argument("--dry-run", action="store_true", help="CPU: small shapes, every path checked, no timing")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("w8a8_prefill_pieces: needs a CUDA GPU (or --dry-run)")
    shapes = DRY_LINEARS if args.dry_run else {name: LINEARS[name] for name in args.linears}
    ms = [17, 40] if args.dry_run else args.m
    started = time.perf_counter()
    out = open(args.json, "a") if args.json else None
    try:
        if device == "cuda":
            emit({"kind": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__}, out)
        for m in ms:
            per_linear = {}
            for name, (n, k) in shapes.items():
                per_linear[name] = pieces(name, n, k, m, device, args.dry_run, out)
                if args.sweep or args.dry_run:
                    sweep(name, n, k, m, device, args.dry_run, out)
            model_linears(m, per_linear, LAYERS, out)
        emit({"kind": "done", "wall_s": time.perf_counter() - started}, out)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
