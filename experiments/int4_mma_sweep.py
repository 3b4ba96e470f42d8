"""kernels/int4_mma.py (tensor-core int4, 1 <= M <= 16) against the other int4 paths and bf16 at
Llama-2-7B's decode shapes, on the GPU: per format (int4 g64, g128, g128 with zero points), shape
and M (1 2 4 8 16), the microseconds, the achieved GB/s of weight bytes (codes + scales + zero
points, our layout: every int4 path is counted on the same bytes) and the fraction of a measured
device-to-device copy ceiling of
- "mma": int4_mma with its heuristic config (int4_mma_config), and "mma_sweep": the CANDIDATES
  configs within --budget-s (candidate-major: a spent budget leaves whole candidates timed on every
  shape), "mma_best": the fastest of each case;
- "gemv_exact" / "gemv_fast": kernels/gemv.py's gemv(..., fast=False / True), plain (no fusion);
- "tinygemm": torch's aten._weight_int4pack_mm (kernels/quant_tinygemm.py);
- "bf16": F.linear on a bf16 weight of the shape (GB/s of its own 2 bytes a weight).
Int4 records carry "x_bf16": the bf16 time over theirs (issue 13's target: 3.0x at batch 1).
Every path is checked against kernels/quant.py's fp32 reference before it is timed, and timed back
to back over distinct weight copies (256 MiB or more, nothing served from L2) in one CUDA graph
(experiments/quant_gemv_sweep.py's helpers: copy ceiling, records, weights, tinygemm).

    python experiments/int4_mma_sweep.py --json int4_mma.jsonl [--formats ...] [--m 1 2 4 8 16] [--budget-s 120]
    python experiments/int4_mma_sweep.py --dry-run   # CPU, interpreted kernels, tiny shapes: the code path only

Output: JSON lines (stdout and --json): {"kind": "ceiling"}, {"kind": "measure"} per (format,
shape, M, path[, config]), {"kind": "suggest"} per (format, M): the config of least total time over
the shapes among those timed on all of them, and {"kind": "done"}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import experiments.quant_gemv_sweep as qs
from eval.bench.common import graph_seconds
from kernels import quant as ref
from kernels._triton import interpreting
from kernels.gemv import gemv
from kernels.int4_mma import Int4MMAWeight, int4_mma, int4_mma_config, repack_int4

SHAPES = {"qkv": (3 * 4096, 4096), "o_proj": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
DRY_SHAPES = {"qkv": (48, 256), "down": (32, 768)}  # --dry-run: interpreted on the CPU (down: split-K)
FORMATS = ["int4_g64", "int4_g128", "int4_g128_zero"]
M_VALUES = [1, 2, 4, 8, 16]
# (BLOCK_N, BLOCK_K, num_warps, num_stages), the likeliest first (experiments/int4_mma_sass_count.py:
# 4.9-6.4 SASS instructions and ~4 shared-memory bytes per weight byte, so the open question is the
# bytes in flight: num_stages 2-3 stage the codes through cp.async, 1 loads them straight into
# registers); SPLIT_K from split_candidates per shape.
CANDIDATES = [(128, 256, 4, 3), (64, 512, 4, 1), (128, 256, 4, 1), (128, 512, 4, 1), (64, 256, 4, 3),
              (128, 256, 4, 2), (64, 512, 4, 2), (64, 256, 4, 1), (128, 256, 8, 3), (128, 512, 4, 2)]
SMS_X2 = 264  # two programs per SM of an H200
COPY_BYTES = 256 << 20


def split_candidates(n: int, k: int, block_n: int, block_k: int) -> list[int]:
    """SPLIT_K values worth timing: the least power of two giving SMS_X2 programs, half and twice
    it, each keeping one K step or more a split."""
    tiles = -(-n // block_n)
    base = 1
    while tiles * base < SMS_X2 and k // (2 * base) >= block_k:
        base *= 2
    return sorted({s for s in (max(1, base // 2), base, 2 * base) if k // s >= block_k})


@dataclass
class Case:
    """One (format, shape, M): weight copies in every path's layout, x, and the timing clock. The
    attributes weights / x / group are what quant_gemv_sweep's tinygemm helpers read."""

    fmt: str
    shape: str
    m: int
    n: int
    k: int
    weights: list  # [(packed uint8, {"quant", "scale", "zero"})], quant_gemv_sweep.make_weights
    mma: list[Int4MMAWeight]
    group: int
    x: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.x = torch.randn(self.m, self.k, device=self.weights[0][0].device, dtype=torch.bfloat16)

    def reference(self) -> torch.Tensor:
        w, q = self.weights[0]
        return ref.int4_linear_fast_ref(self.x, w, q["scale"], q["zero"])


def check(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    if not err < 1e-2:
        raise ValueError(f"{what} differs from the fp32 reference: relative error {err:.3g}")


def wall_seconds(run: Callable[[], Any], reps: int = 1) -> float:
    """--dry-run's clock: one call timed on the host (the interpreter: only the code path counts)."""
    start = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - start) / reps


def cpu_copy_ceiling_tbps() -> float:
    a = torch.empty(64 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    start = time.perf_counter()
    b.copy_(a)
    return 2 * a.numel() / (time.perf_counter() - start) / 1e12


def tinygemm_seconds(case: Case, cache: dict, seconds_of: Callable) -> float:
    """The case's copies in tinygemm's layout (made once into ``cache``: a torch without the op
    raises here, inside the measurement), quant_gemv_sweep's check, then seconds per call over all
    copies on ``seconds_of``'s clock."""
    if "packs" not in cache:
        cache["packs"] = qs.tinygemm_weights(case)[0]
    packs = cache["packs"]
    qs.tinygemm_check(case, packs)
    return seconds_of(lambda: [qs.tinygemm_mm(case.x, w, case.group, sz) for w, sz in packs]) / len(packs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=None, help=f"of {list(SHAPES)}")
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES, help="batch rows (1..16)")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="seconds of config sweeping after the fixed measurements")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, interpreted kernels (set TRITON_INTERPRET=1), tiny shapes, host-clock timings")
    args = ap.parse_args(argv)
    dry = args.dry_run
    shapes_all = DRY_SHAPES if dry else SHAPES
    shapes = args.shapes or list(shapes_all)
    dev = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("int4_mma_sweep needs a CUDA GPU (or --dry-run)")
    if dry and not interpreting():
        raise SystemExit("int4_mma_sweep --dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    seconds_of = wall_seconds if dry else graph_seconds
    started = time.perf_counter()
    log = qs.Records(args.json, dev, cpu_copy_ceiling_tbps() if dry else qs.copy_ceiling_tbps())
    records, emit, ceiling = log.records, log.emit, log.ceiling
    bf16_seconds: dict[tuple[str, int], float] = {}

    def measure(case_fmt: str, shape: str, m: int, n: int, k: int, path: str, seconds: Callable[[], float],
                nbytes: int, **extra: Any) -> dict:
        rec = {"kind": "measure", "format": case_fmt, "shape": shape, "M": m, "N": n, "K": k, "path": path,
               "weight_bytes": nbytes, **extra}
        try:
            s = seconds()
            gbps = nbytes / s / 1e9
            rec.update(seconds=s, us=s * 1e6, GBps=gbps, of_copy_ceiling=gbps / (ceiling * 1e3))
            if case_fmt != "bf16" and (shape, m) in bf16_seconds:
                rec["x_bf16"] = bf16_seconds[(shape, m)] / s
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects, a torch without tinygemm
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        emit(rec)
        return rec

    def copies(nbytes: int) -> int:
        return 1 if dry else max(8, -(-COPY_BYTES // nbytes))

    # bf16 F.linear per shape and M: the baseline of the x_bf16 ratios
    for shape in shapes:
        n, k = shapes_all[shape]
        dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies(n * k * 2))]
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            rec = measure("bf16", shape, m, n, k, "bf16",
                          lambda: seconds_of(lambda: [F.linear(x, w) for w in dense]) / len(dense), n * k * 2)
            if "seconds" in rec:
                bf16_seconds[(shape, m)] = rec["seconds"]
        del dense

    def timed(case: Case, fn: Callable[[int], torch.Tensor], what: str) -> Callable[[], float]:
        """Seconds per call of fn(copy index) over all copies, after a check of copy 0."""
        def run() -> float:
            check(fn(0), case.reference(), what)
            return seconds_of(lambda: [fn(i) for i in range(len(case.mma))]) / len(case.mma)
        return run

    sweep: list[Case] = []
    for fmt in args.formats:
        _, group, _ = qs.fmt_quant(fmt)
        for shape in shapes:
            n, k = shapes_all[shape]
            weights, nbytes = qs.make_weights(fmt, n, k, copies(n * k // 2), dev=dev)
            mma = [repack_int4(w, q["scale"], q["zero"]) for w, q in weights]
            assert mma[0].nbytes() == nbytes, (mma[0].nbytes(), nbytes)  # the same bytes on every path
            packs: dict[str, list] = {}  # tinygemm's layout of the copies, made on first use (inside measure)
            for m in args.m:
                case = Case(fmt, shape, m, n, k, weights, mma, group)
                x = case.x
                cfg = int4_mma_config(m, n, k, group)
                measure(fmt, shape, m, n, k, "mma", timed(case, lambda i: int4_mma(x, case.mma[i], config=cfg), "mma"),
                        nbytes, config=list(cfg))
                for fast in (False, True):
                    def call(i: int, fast: bool = fast) -> torch.Tensor:
                        w, q = case.weights[i]
                        return gemv(x, w, **q, fast=fast)
                    measure(fmt, shape, m, n, k, "gemv_fast" if fast else "gemv_exact", timed(case, call, "gemv"),
                            nbytes)
                measure(fmt, shape, m, n, k, "tinygemm", lambda: tinygemm_seconds(case, packs, seconds_of), nbytes)
                sweep.append(case)  # the sweep times the same weight copies later
            del packs

    # the config sweep, candidate-major within the budget
    sweep_start = time.perf_counter()
    for block_n, block_k, num_warps, num_stages in CANDIDATES:
        for case in sweep:
            if time.perf_counter() - sweep_start >= args.budget_s:
                break
            if block_k % case.group:
                continue
            for split in split_candidates(case.n, case.k, block_n, block_k):
                cfg = (block_n, block_k, split, num_warps, num_stages)
                x = case.x
                measure(case.fmt, case.shape, case.m, case.n, case.k, "mma_sweep",
                        timed(case, lambda i: int4_mma(x, case.mma[i], config=cfg), f"mma {cfg}"),
                        case.mma[0].nbytes(), config=list(cfg))
    for case in sweep:  # the fastest config of each case, heuristic included
        timed_recs = [r for r in records if (r["format"], r["shape"], r["M"]) == (case.fmt, case.shape, case.m)
                      and r["path"] in ("mma", "mma_sweep") and "seconds" in r]
        if timed_recs:
            best = min(timed_recs, key=lambda r: r["seconds"])
            emit({**best, "path": "mma_best", "of_configs": len(timed_recs)})
    for fmt in args.formats:
        for m in args.m:
            rec = suggest(records, fmt, m)
            if rec is not None:
                emit(rec)
    emit({"kind": "done", "wall_s": time.perf_counter() - started})
    log.close()


def suggest(records: list[dict], fmt: str, m: int) -> dict | None:
    """The int4_mma config (BLOCK_N, BLOCK_K, num_warps, num_stages: SPLIT_K depends on the shape,
    the best one per shape taken) of least total time over the shapes at (format, M), among those
    timed on every shape that has a record, or None."""
    timed = [r for r in records if r.get("kind") == "measure" and r["format"] == fmt and r["M"] == m
             and r["path"] in ("mma", "mma_sweep") and "seconds" in r]
    shapes = {r["shape"] for r in timed}
    per_config: dict[tuple, dict] = {}
    for r in timed:
        key = (r["config"][0], r["config"][1], r["config"][3], r["config"][4])
        best = per_config.setdefault(key, {})
        if r["seconds"] < best.get(r["shape"], (float("inf"), 0))[0]:
            best[r["shape"]] = (r["seconds"], r["config"][2])
    totals = {c: sum(t for t, _ in per.values()) for c, per in per_config.items() if set(per) == shapes}
    if not totals:
        return None
    best = min(totals, key=totals.get)
    return {"kind": "suggest", "format": fmt, "M": m, "entry": list(best), "total_us": totals[best] * 1e6,
            "split_k": {shape: split for shape, (_, split) in sorted(per_config[best].items())},
            "shapes": sorted(shapes)}


if __name__ == "__main__":
    main()
