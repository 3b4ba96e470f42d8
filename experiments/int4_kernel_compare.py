"""Int4 decode matmuls at Llama-2-7B's shapes, our Triton GEMV against torch's tinygemm, at
M = 1, 2, 4, 8, 16: the two kernels ModelOptions.int4_kernel chooses between.

- "triton": kernels/gemv.py's int4 GEMV as the engine's fused decode launches it (norm prologue,
  SwiGLU or residual epilogue), with its default dequantization;
- "tinygemm": aten._weight_int4pack_mm on the same codes (kernels/quant_tinygemm.py), unfused.

Each kernel runs back to back over distinct weight copies (256 MiB or more) in one CUDA graph
(experiments/quant_gemv_sweep.py's cases). GB/s counts the bytes each kernel reads and writes:
its packed codes, its scales / zeros (ours fp32 [N, G] each; tinygemm's bf16 [G, N, 2]) and the
activations in and out (and the residual the fused epilogue reads). One JSON object per line (stdout and --json): {"kind": "ceiling"}, one
{"kind": "measure"} per (format, shape, M, path), one {"kind": "compare"} per (format, shape, M)
with tinygemm's speedup, {"kind": "done"}.

    python experiments/int4_kernel_compare.py --json int4_compare.jsonl [--formats ...] [--m 1 2 4 8 16]
    python experiments/int4_kernel_compare.py --dry-run   # CPU: small shapes, both paths checked, no timing
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from experiments import quant_gemv_sweep as sweep
from kernels.gemv import FAST_BY_DEFAULT

FORMATS = ["int4_g64", "int4_g128", "int4_g128_zero"]
DRY_SHAPES = {"qkv": (384, 128, "norm"), "o_proj": (128, 128, "residual"), "gate_up": (512, 128, "swiglu"),
              "down": (128, 256, "residual")}


def activation_bytes(case: sweep.Case, out_columns: int, residual: bool = False) -> int:
    """bf16 rows in (M x K) and out (M x out_columns), and the residual rows read (M x out_columns)."""
    return case.m * (case.k + out_columns * (2 if residual else 1)) * 2


def compare(case: sweep.Case, dry_run: bool) -> list[dict[str, Any]]:
    """The case's measure records (triton, tinygemm) and their compare record; dry_run: the
    outputs checked, nothing timed."""
    fast = FAST_BY_DEFAULT["int4"]
    packs, tiny_weight_bytes = sweep.tinygemm_weights(case)
    paths = {
        "triton": (case.bytes + activation_bytes(case, case.n_out, case.fusion == "residual"),
                   lambda: case.time(fast=fast)),
        "tinygemm": (tiny_weight_bytes + activation_bytes(case, case.n), lambda: sweep.tinygemm_seconds(case, packs)),
    }
    base = {"format": case.fmt, "shape": case.shape, "M": case.m, "N": case.n, "K": case.k}
    records = []
    for path, (nbytes, seconds) in paths.items():
        rec = {"kind": "measure", **base, "path": path, "bytes": nbytes,
               "fusion": case.fusion if path == "triton" else "none"}
        try:
            if dry_run:
                if path == "tinygemm":
                    sweep.tinygemm_check(case, packs)
                else:
                    w, q = case.weights[0]
                    case.call(w, q, fast=fast, pdl=False)
                rec["checked"] = True
            else:
                s = seconds()
                rec.update(seconds=s, us=s * 1e6, GBps=nbytes / s / 1e9)
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        records.append(rec)
    triton, tiny = records
    if "seconds" in triton and "seconds" in tiny:
        records.append({"kind": "compare", **base, "triton_us": triton["us"], "tinygemm_us": tiny["us"],
                        "tinygemm_speedup": triton["seconds"] / tiny["seconds"]})
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=list(sweep.SHAPES), choices=list(sweep.SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="batch rows (1..16)")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shapes: check both paths, time nothing")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("int4_kernel_compare needs a CUDA GPU (or --dry-run)")
    shapes = DRY_SHAPES if args.dry_run else sweep.SHAPES
    started = time.perf_counter()
    ceiling = None if args.dry_run else sweep.copy_ceiling_tbps()
    log = sweep.Records(args.json, "cpu" if args.dry_run else "cuda", ceiling)
    emit = log.emit
    original = sweep.SHAPES, sweep.DEVICE
    sweep.SHAPES, sweep.DEVICE = shapes, "cpu" if args.dry_run else "cuda"  # what Case and make_weights read
    try:
        for fmt in args.formats:
            for shape in args.shapes:
                n, k, _ = shapes[shape]
                copies = 2 if args.dry_run else max(8, -(-sweep.COPY_BYTES // (n * k // 2)))
                weights, nbytes = sweep.make_weights(fmt, n, k, copies)
                for m in args.m:
                    for rec in compare(sweep.Case(fmt, shape, m, weights, nbytes), args.dry_run):
                        if ceiling and "GBps" in rec:
                            rec["of_copy_ceiling"] = rec["GBps"] / (ceiling * 1e3)
                        emit(rec)
                del weights
                if not args.dry_run:
                    torch.cuda.empty_cache()
    finally:
        sweep.SHAPES, sweep.DEVICE = original
    emit({"kind": "done", "wall_s": time.perf_counter() - started})
    log.close()


if __name__ == "__main__":
    main()
