"""The 2:4 decode GEMV (kernels/quant_gemv.py) at Llama-2-7B's shapes on the GPU, one call of at
most ~90 s: per kept-value format (bf16 values; int4 g128 codes), shape and M (1 and 16), the
achieved GB/s (bytes = kept values + positions + scales + x + out) and the fraction of a measured
device-to-device copy ceiling, for
- "default": sparse24_gemv with its default tiles per path: at M == 1 "select" (SELECT_CONFIG, the
  old path) and, for int4 codes, "fast" (FAST_CONFIG: PRMT-picked inputs, the new path); above
  M == 1 "dot" (DOT_CONFIG) and, for int4 codes, "fast_rows" (the fast kernel once a row); for
  int4 codes at every M "mma" (kernels/sparse24_mma.py's tensor-core GEMM, int4_mma_config's
  tile: Sparse24Linear's 2..16-row candidate);
- "sweep": the candidate tiles of the path M takes, candidate-major within --budget-s (each new
  tile compiles), and "best" per case;
- baselines of the same shape and M: "dense_bf16" (F.linear, cuBLAS, on the dense weight) and
  "int4_g128" (kernels/gemv.py's unfused int4 GEMV with the engine's default dequantization: the
  fast path at M == 1), "int4_mma" (kernels/int4_mma.py's tensor-core GEMM on the dense codes)
  and "tinygemm" (aten._weight_int4pack_mm on the same codes; CUDA only).
Each kernel runs back to back on distinct weight copies (256 MiB or more, so nothing is served
from L2) inside a CUDA graph (eval/bench/common.graph_seconds).

    python experiments/sparse24_gemv_sweep.py --json sparse24_sweep.jsonl [--m 1 2 4 8 16] [--budget-s 25]
    python experiments/sparse24_gemv_sweep.py --dry-run  # CPU: interpreted kernels, tiny shapes, a fake clock

Output: JSON lines: {"kind": "ceiling"}, {"kind": "measure"} per (format, shape, M, path[, config]),
{"kind": "best"} per case, {"kind": "suggest"} per (format, path): the tile with the least total
time over the shapes among those timed on all of them (the value for SELECT_CONFIG / DOT_CONFIG;
for "mma" a tile of MMA_CANDIDATES, its SPLIT_K per shape and M by int4_mma_sweep's rule), and
{"kind": "done"}.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from eval.bench.common import graph_seconds
from experiments.int4_mma_sweep import CANDIDATES as MMA_TILES
from experiments.int4_mma_sweep import split_candidates
from experiments.quant_gemv_sweep import Records, _rel, copy_ceiling_tbps
from kernels import quant as ref
from kernels.gemv import FAST_BY_DEFAULT, gemv
from kernels.int4_mma import int4_mma, int4_mma_config, repack_int4
from kernels.quant_gemv import DOT_CONFIG, FAST_CONFIG, SELECT_CONFIG, sparse24_gemv
from kernels.sparse24_mma import sparse24_mma, sparse24_mma_weight
from kernels.quant_tinygemm import pack_for_gpu, scales_and_zeros, tinygemm_mm

SHAPES = {"qkv": (3 * 4096, 4096), "o_proj": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
FORMATS = ["bf16", "int4_g128"]
# (BLOCK_N, BLOCK_K, num_warps) per path, likeliest first
SELECT_CANDIDATES = [(16, 2048, 4), (8, 4096, 4), (4, 4096, 4), (16, 1024, 4), (8, 1024, 4), (32, 1024, 4),
                     (16, 2048, 8), (4, 2048, 4), (64, 256, 4)]
DOT_CANDIDATES = [(32, 128, 4), (16, 128, 4), (64, 64, 4), (32, 256, 4), (128, 128, 8), (16, 64, 4)]
FAST_CANDIDATES = [(4, 4096, 4), (4, 4096, 2), (8, 2048, 4), (16, 2048, 4), (8, 4096, 8), (16, 1024, 4),
                   (4, 8192, 4), (4, 2048, 4), (8, 4096, 4), (2, 8192, 4), (4, 4096, 8), (2, 4096, 2)]
# "mma": (BLOCK_N, BLOCK_K, num_warps, num_stages), int4_mma_sweep's tiles, SPLIT_K per case (mma_config)
MMA_CANDIDATES = list(MMA_TILES[:6])
DEFAULTS = {"select": SELECT_CONFIG, "dot": DOT_CONFIG, "fast": FAST_CONFIG, "fast_rows": FAST_CONFIG,
            "mma": None}  # "mma": int4_mma_config's, per shape and M
DRY_SHAPES = {"a": (48, 256), "b": (16, 384)}  # --dry-run
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


def tinygemm_seconds(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor]) -> float:
    """aten._weight_int4pack_mm (g128, symmetric) on the copies' codes, checked against the fp32
    reference on the first, seconds per launch (its repacking outside the timing)."""
    packs = [(pack_for_gpu(w), scales_and_zeros(s, None, torch.bfloat16)) for w, s in zip(packed, scales)]
    err = _rel(tinygemm_mm(x, packs[0][0], 128, packs[0][1]), ref.int4_linear_fast_ref(x, packed[0], scales[0], None))
    if not err < 2e-2:
        raise ValueError(f"tinygemm differs from the reference: relative error {err:.3g}")
    return copies_seconds(lambda p: tinygemm_mm(x, p[0], 128, p[1]), packs)


def _dry_run() -> None:
    """--dry-run: the CPU, DRY_SHAPES, one run per timing at a fake 1 ms, a fake 1 TB/s ceiling,
    one candidate tile per path (the flow and its records, no timings)."""
    global DEVICE, SHAPES, COPY_BYTES, SELECT_CANDIDATES, DOT_CANDIDATES, FAST_CANDIDATES, MMA_CANDIDATES
    global graph_seconds, copy_ceiling_tbps

    def one_run_seconds(run: Callable[[], object], reps: int = 10) -> float:
        run()
        return 1e-3

    DEVICE, SHAPES, COPY_BYTES = "cpu", DRY_SHAPES, 1
    SELECT_CANDIDATES, DOT_CANDIDATES, FAST_CANDIDATES = [(8, 64, 4)], [(16, 64, 4)], [(4, 128, 4)]
    MMA_CANDIDATES = [(16, 128, 4, 1)]
    graph_seconds, copy_ceiling_tbps = one_run_seconds, lambda: 1.0


def mma_config(tile: tuple[int, int, int, int], n: int, k: int) -> tuple[int, int, int, int, int]:
    """An MMA_CANDIDATES tile with its SPLIT_K: the least power of two giving two programs an SM
    (int4_mma_sweep's split_candidates, the middle one)."""
    block_n, block_k, warps, stages = tile
    splits = split_candidates(n, k, block_n, block_k) or [1]
    return block_n, block_k, splits[len(splits) // 2], warps, stages


def copies_seconds(fn: Callable[[object], object], items: list) -> float:
    """Seconds per fn(item), every item once per graph replay, after an eager warm-up call."""
    fn(items[0])
    return graph_seconds(lambda: [fn(item) for item in items]) / len(items)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="batch rows (1..16)")
    ap.add_argument("--paths", nargs="+", default=None, choices=list(DEFAULTS),
                    help="only these sparse paths (default: every path M takes)")
    ap.add_argument("--budget-s", type=float, default=25.0, help="seconds of tile sweeping after the fixed rows")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU: interpreted kernels (set TRITON_INTERPRET=1), tiny shapes, one run per "
                         "timing at a fake 1 ms, a fake 1 TB/s ceiling: the flow and the records, no timings")
    args = ap.parse_args(argv)
    if args.dry_run:
        _dry_run()
        args.shapes = [s for s in args.shapes if s in SHAPES] or list(SHAPES)
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
            mma_weights = [repack_int4(w, sc) for w, sc in zip(packed, scales)]
            measure({"format": "int4_g128", "shape": shape, "M": m, "path": "int4_mma"},
                    n * k // 2 + n * k // 128 * 4 + io_bytes(m, n, k),
                    lambda: copies_seconds(lambda w: int4_mma(x, w), mma_weights))
            del mma_weights
            if DEVICE == "cuda":
                measure({"format": "int4_g128", "shape": shape, "M": m, "path": "tinygemm"},
                        n * k // 2 + n * k // 128 * 4 + io_bytes(m, n, k), lambda: tinygemm_seconds(x, packed, scales))
            else:
                emit({"kind": "measure", "format": "int4_g128", "shape": shape, "M": m, "path": "tinygemm",
                      "skipped": "aten._weight_int4pack_mm: CUDA only"})
        del packed, scales
        for fmt in args.formats:
            weights, nbytes = make_weights(fmt, n, k, max(2, -(-COPY_BYTES // (n * k // (2 if fmt == "bf16" else 4)))))
            mma_weights = [sparse24_mma_weight(*w) for w in weights] if fmt != "bf16" else []  # the same tensors
            for m in args.m:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                total = nbytes + io_bytes(m, n, k)
                kept, meta, scale, zero = weights[0]
                dense = (ref.decompress_24(kept.float(), ref.unpack_meta_24(meta)) if scale is None
                         else ref.sparse24_int4_dequantize(kept, meta, scale, zero))
                want = ref.fp32_weight_linear_ref(x, dense)
                del dense

                if fmt == "bf16":
                    paths = ["dot"] if m > 1 else ["select"]
                else:
                    paths = ["dot", "fast_rows", "mma"] if m > 1 else ["select", "fast", "mma"]
                paths = [p for p in paths if args.paths is None or p in args.paths]
                for path in paths:
                    def timer(config=None, x=x, weights=weights, mma_weights=mma_weights, want=want, path=path):
                        if path == "mma":
                            config = config and mma_config(config, n, k)
                            run = lambda w: sparse24_mma(x, w, config=config)  # noqa: E731
                            items = mma_weights
                        else:
                            run = lambda w: sparse24_gemv(x, *w, config=config, path=path)  # noqa: E731
                            items = weights
                        err = _rel(run(items[0]), want)
                        if not err < 2e-2:
                            raise ValueError(f"{path} config {config}: relative error {err:.3g}")
                        return copies_seconds(run, items)

                    base = {"format": f"sparse24_{fmt}", "shape": shape, "M": m, "path": path}
                    default = DEFAULTS[path] or int4_mma_config(m, n, k, int(fmt.split("_g")[1]))
                    measure({**base, "config": list(default)}, total, timer, default=True)
                    cases.append((base, total, timer, DEFAULTS[path]))
            del weights, mma_weights
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    sweep_start = time.perf_counter()
    candidates = {"select": SELECT_CANDIDATES, "dot": DOT_CANDIDATES, "fast": FAST_CANDIDATES,
                  "fast_rows": FAST_CANDIDATES, "mma": MMA_CANDIDATES}
    for i in range(max(map(len, candidates.values()))):
        for base, total, timer, default in cases:
            cands = candidates[base["path"]]
            if i >= len(cands) or cands[i] == default or time.perf_counter() - sweep_start >= args.budget_s:
                continue
            measure({**base, "config": list(cands[i])}, total, lambda: timer(cands[i]))
    for base, _, _, _ in cases:
        timed = [r for r in records if all(r.get(key) == v for key, v in base.items()) and "seconds" in r]
        if timed:
            emit({**min(timed, key=lambda r: r["seconds"]), "kind": "best", "of_configs": len(timed)})
    for fmt in args.formats:
        for path in DEFAULTS:
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
