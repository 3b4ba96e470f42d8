"""The 2:4 decode GEMV (kernels/quant_gemv.py) at Llama-2-7B's shapes on the GPU, one call of at
most ~90 s: per kept-value format (bf16 values; int4 g128 codes), shape and M (1 and 16), the
achieved GB/s (bytes = kept values + positions + scales + x + out) and the fraction of a measured
device-to-device copy ceiling, for
- "default": sparse24_gemv with its default tiles (SELECT_CONFIG at M == 1, DOT_CONFIG above);
- "sweep": the candidate tiles of the path M takes, candidate-major within --budget-s (each new
  tile compiles), and "best" per case;
- baselines of the same shape and M: "dense_bf16" (F.linear, cuBLAS, on the dense weight) and
  "int4_g128" (kernels/gemv.py's unfused int4 GEMV with the engine's default dequantization).
Each kernel runs back to back on distinct weight copies (256 MiB or more, so nothing is served
from L2) inside a CUDA graph (eval/bench/common.graph_seconds).

    python experiments/sparse24_gemv_sweep.py --json sparse24_sweep.jsonl [--m 1 16] [--budget-s 25]

Output: JSON lines: {"kind": "ceiling"}, {"kind": "measure"} per (format, shape, M, path[, config]),
{"kind": "best"} per case, {"kind": "suggest"} per (format, path): the tile with the least total
time over the shapes among those timed on all of them (the value for SELECT_CONFIG / DOT_CONFIG),
and {"kind": "done"}.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from eval.bench.common import graph_seconds
from experiments.quant_gemv_sweep import Records, _rel, copy_ceiling_tbps
from kernels import quant as ref
from kernels.gemv import FAST_BY_DEFAULT, gemv
from kernels.quant_gemv import DOT_CONFIG, SELECT_CONFIG, sparse24_gemv

SHAPES = {"qkv": (3 * 4096, 4096), "o_proj": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
FORMATS = ["bf16", "int4_g128"]
# (BLOCK_N, BLOCK_K, num_warps) per path, likeliest first
SELECT_CANDIDATES = [(16, 2048, 4), (8, 4096, 4), (4, 4096, 4), (16, 1024, 4), (8, 1024, 4), (32, 1024, 4),
                     (16, 2048, 8), (4, 2048, 4), (64, 256, 4)]
DOT_CANDIDATES = [(32, 128, 4), (16, 128, 4), (64, 64, 4), (32, 256, 4), (128, 128, 8), (16, 64, 4)]
COPY_BYTES = 256 << 20
DEVICE = "cuda"  # the CPU smoke test (tests/kernels/test_sparse24_gemv_sweep.py) sets "cpu"


def make_weights(fmt: str, n: int, k: int, copies: int) -> tuple[list[tuple], int]:
    """`copies` random 2:4 weights as sparse24_gemv's (kept, meta, scale, zero); bytes of one
    (kept + meta + scales)."""
    out = []
    for _ in range(copies):
        pos = torch.rand(n, k // 4, 4, device=DEVICE).argsort(dim=-1)[..., :2].sort(dim=-1).values
        meta = ref.pack_meta_24(pos.reshape(n, k // 2).to(torch.uint8))
        if fmt == "bf16":
            out.append(((torch.randn(n, k // 2, device=DEVICE) * 0.02).to(torch.bfloat16), meta, None, None))
        else:
            group = int(fmt.split("_g")[1])
            packed = torch.randint(0, 256, (n, k // 4), device=DEVICE, dtype=torch.uint8)
            out.append((packed, meta, torch.rand(n, k // group, device=DEVICE) * 1e-2 + 1e-3, None))
    kept, meta, scale, _ = out[0]
    nbytes = sum(t.numel() * t.element_size() for t in (kept, meta, scale) if t is not None)
    return out, nbytes


def copies_seconds(fn: Callable[[object], object], items: list) -> float:
    """Seconds per fn(item), every item once per graph replay, after an eager warm-up call."""
    fn(items[0])
    return graph_seconds(lambda: [fn(item) for item in items]) / len(items)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16], help="batch rows (1..16)")
    ap.add_argument("--budget-s", type=float, default=25.0, help="seconds of tile sweeping after the fixed rows")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sparse24_gemv_sweep needs a CUDA GPU")
    started = time.perf_counter()
    log = Records(args.json, DEVICE, copy_ceiling_tbps())
    records, emit, ceiling = log.records, log.emit, log.ceiling

    def measure(base: dict, nbytes: int, seconds: Callable[[], float], **extra) -> None:
        rec = {"kind": "measure", **base, "bytes": nbytes, **extra}
        try:
            s = seconds()
            rec.update(seconds=s, us=s * 1e6, GBps=nbytes / s / 1e9, of_copy_ceiling=nbytes / s / 1e12 / ceiling)
        except Exception as e:  # noqa: BLE001 - a tile the compiler rejects
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        emit(rec)

    def io_bytes(m: int, n: int, k: int) -> int:
        return 2 * m * (n + k)  # bf16 x and out

    cases = []  # (fmt, shape, m, weights, nbytes, x, path) for the sweep
    for shape in args.shapes:
        n, k = SHAPES[shape]
        dense = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
                 for _ in range(max(2, -(-COPY_BYTES // (n * k * 2))))]
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            measure({"format": "dense_bf16", "shape": shape, "M": m, "path": "cublas"}, n * k * 2 + io_bytes(m, n, k),
                    lambda: copies_seconds(lambda w: F.linear(x, w), dense))
        del dense
        packed = [torch.randint(0, 256, (n, k // 2), device=DEVICE, dtype=torch.uint8)
                  for _ in range(max(2, -(-COPY_BYTES // (n * k // 2))))]
        scales = [torch.rand(n, k // 128, device=DEVICE) * 1e-2 + 1e-3 for _ in packed]
        fast = FAST_BY_DEFAULT["int4"]
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            measure({"format": "int4_g128", "shape": shape, "M": m, "path": "gemv_int4"},
                    n * k // 2 + n * k // 128 * 4 + io_bytes(m, n, k),
                    lambda: copies_seconds(lambda ws: gemv(x, ws[0], quant="int4", scale=ws[1], zero=None, fast=fast),
                                           list(zip(packed, scales))))
        del packed, scales
        for fmt in args.formats:
            weights, nbytes = make_weights(fmt, n, k, max(2, -(-COPY_BYTES // (n * k // (2 if fmt == "bf16" else 4)))))
            for m in args.m:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                path = "select" if m == 1 else "dot"
                total = nbytes + io_bytes(m, n, k)
                kept, meta, scale, zero = weights[0]
                dense = (ref.decompress_24(kept.float(), ref.unpack_meta_24(meta)) if scale is None
                         else ref.sparse24_int4_dequantize(kept, meta, scale, zero))
                want = ref.fp32_weight_linear_ref(x, dense)
                del dense

                def timer(config=None, x=x, weights=weights, want=want):
                    err = _rel(sparse24_gemv(x, *weights[0], config=config), want)
                    if not err < 2e-2:
                        raise ValueError(f"config {config}: relative error {err:.3g}")
                    return copies_seconds(lambda w: sparse24_gemv(x, *w, config=config), weights)

                base = {"format": f"sparse24_{fmt}", "shape": shape, "M": m, "path": path}
                default = SELECT_CONFIG if path == "select" else DOT_CONFIG
                measure({**base, "config": list(default)}, total, timer, default=True)
                cases.append((base, total, timer, default))
            del weights
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    sweep_start = time.perf_counter()
    for i in range(max(len(SELECT_CANDIDATES), len(DOT_CANDIDATES))):
        for base, total, timer, default in cases:
            cands = SELECT_CANDIDATES if base["path"] == "select" else DOT_CANDIDATES
            if i >= len(cands) or cands[i] == default or time.perf_counter() - sweep_start >= args.budget_s:
                continue
            measure({**base, "config": list(cands[i])}, total, lambda: timer(cands[i]))
    for base, _, _, _ in cases:
        timed = [r for r in records if all(r.get(key) == v for key, v in base.items()) and "seconds" in r]
        if timed:
            emit({**min(timed, key=lambda r: r["seconds"]), "kind": "best", "of_configs": len(timed)})
    for fmt in args.formats:
        for path in ("select", "dot"):
            rows = [r for r in records if r["format"] == f"sparse24_{fmt}" and r["path"] == path and "seconds" in r]
            shapes = {r["shape"] for r in rows}
            per: dict[tuple, dict] = {}
            for r in rows:
                per.setdefault(tuple(r["config"]), {})[(r["shape"], r["M"])] = r["seconds"]
            keys = {(r["shape"], r["M"]) for r in rows}
            totals = {c: sum(t.values()) for c, t in per.items() if set(t) == keys}
            if totals:
                best = min(totals, key=totals.get)
                emit({"kind": "suggest", "format": f"sparse24_{fmt}", "path": path, "config": list(best),
                      "total_us": totals[best] * 1e6, "shapes": sorted(shapes)})
    emit({"kind": "done", "wall_s": time.perf_counter() - started})
    log.close()


if __name__ == "__main__":
    main()
