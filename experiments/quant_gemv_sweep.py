"""Compressed-weight decode GEMVs at Llama-2-7B's shapes on the GPU, in one run of about four
minutes: per format (int8, int4 g64 / g128, int4 g128 with zero points, W8A8 int8), shape and
M (1 and 16), the achieved GB/s of weight bytes (codes + scales + zero points), and the fraction
of a measured device-to-device copy ceiling, for
- "exact": kernels/gemv.py's exact dequantization with its heuristic config (gemv_config; every
  format at M > 1), and for int8 at M > 1 "exact_sweep": the EXACT_TILES candidates, "exact_split":
  gemv's split-K at the EXACT_SPLITS candidates;
- "fast" (M == 1): the fast dequantization with its heuristic (fast_gemv_config, FAST_M1_CONFIGS),
  and "fast_best": the best of the FAST_M1_CONFIGS candidates swept within --budget-s;
- "tinygemm": torch's aten._weight_int4pack_mm (gpt-fast's int4 kernel; int4 formats, CUDA), a
  plain matmul of the same codes without the fusions (kernels/quant_tinygemm.py; GB/s of our
  layout's bytes, as the other paths: experiments/int4_kernel_compare.py counts its own);
- "bf16": the dense bf16 gemv of the shape with the same fusion (the baseline).
Each kernel is launched back to back on distinct weight copies (256 MiB or more in all, so
nothing is served from L2) inside a CUDA graph, PDL as the engine launches it; the fused
norm / residual / SwiGLU epilogues as the engine runs each shape.

    python experiments/quant_gemv_sweep.py --json quant_sweep.jsonl [--formats ...] [--m 1 16] [--budget-s 100]

int8 (issue 13; at M == 1 _matmul_fast, the per-code gather, which the H200 timed faster than int4's
run layout: kernels/gemv.py's docstring; at M > 1 the exact path's tiles and split-K):
    python experiments/quant_gemv_sweep.py --formats int8 --m 1 2 16 --budget-s 120 --json int8.jsonl

Output: one JSON object per line (stdout and --json): {"kind": "ceiling"}, one {"kind":
"measure"} per (format, shape, M, path), one {"kind": "suggest"} per format (the candidate entry
with the least total time over the four shapes among those timed on all of them: the value to put
in FAST_M1_CONFIGS), and {"kind": "done"}.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from eval.bench.common import graph_seconds
from kernels import quant as ref
from kernels.gemv import FAST_M1_CONFIGS, fast_gemv_config, gemv, gemv_config
from kernels.quant_tinygemm import pack_for_cpu, pack_for_gpu, scales_and_zeros, tinygemm_mm

SHAPES = {  # Llama-2-7B decode linears: name -> (N, K, fusion as the engine runs it)
    "qkv": (3 * 4096, 4096, "norm"),
    "o_proj": (4096, 4096, "residual"),
    "gate_up": (2 * 11008, 4096, "swiglu"),
    "down": (4096, 11008, "residual"),
}
FORMATS = ["int8", "int4_g64", "int4_g128", "int4_g128_zero", "w8a8_int8"]
# FAST_M1_CONFIGS candidates (BLOCK_N, BLOCK_K, num_warps), the likeliest first: more columns or
# wider K steps hold more bytes in flight per program, fewer keep the registers (and occupancy) up.
# (8, 2048, 2), (16, 4096, 4), (8, 4096, 2), (4, 4096, 2): int4's M == 1 path (_matmul_fast_runs)
# at the fewest SASS instructions per weight byte (experiments/gemv_sass_count.py: 8.4-8.6 at
# (8, 2048, 2) on the four shapes, no spill, against 9.6-9.7 at (8, 2048, 4)), where a step's
# runs of 4 words cover every warp (BLOCK_K >= 1024 * num_warps: x needs no shared-memory shuffle).
FAST_CANDIDATES = [(8, 2048, 4), (16, 2048, 4), (8, 4096, 4), (8, 2048, 2), (16, 4096, 4), (8, 4096, 2),
                   (4, 4096, 2), (4, 4096, 4), (16, 1024, 4), (8, 2048, 8), (32, 1024, 4), (4, 2048, 4),
                   (16, 2048, 8), (8, 1024, 4), (32, 1024, 8), (16, 4096, 8), (4, 8192, 8), (2, 8192, 4)]
# The exact path's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) candidates for int8 at M > 1, gemv_config's
# (16, 32, 256, 4) first: at N 4096 it makes 128 programs of 4 warps, one an SM, 8 KB of codes and
# 8 KB of x a K step (gemv_sass_count.py: 5.0 SASS / weight byte, 80 registers); 16 columns make two
# programs an SM, 512-wide steps twice the codes in flight (bf16's 256-wide tile holds as many bytes).
EXACT_TILES = [(16, 32, 256, 4), (16, 16, 512, 2), (16, 32, 512, 4), (16, 16, 256, 2), (16, 64, 256, 4),
               (16, 16, 1024, 2)]
# (tile, split_k) candidates of gemv's split-K for int8 at M > 1 ("exact_split" rows): 2-4 programs a
# tile where N 4096 leaves 128 tiles; 64 columns a tile halve the x bytes a weight byte costs (at 32
# columns each program reads as many bytes of x, from L2, as of codes).
EXACT_SPLITS = [((16, 32, 256, 4), 2), ((16, 32, 256, 4), 4), ((16, 64, 256, 4), 4), ((16, 32, 512, 4), 4),
                ((16, 64, 512, 4), 4), ((16, 16, 512, 2), 2)]
COPY_BYTES = 256 << 20  # weight copies per case: far more than L2
DEVICE = "cuda"  # a CPU smoke test of the script's flow sets "cpu" (tests/kernels/test_quant_gemv_sweep.py)


def fmt_quant(fmt: str) -> tuple[str, int, bool]:
    """(gemv's quant, int4 group or 1, zero points) of a format name ("bf16": dense)."""
    if fmt == "bf16":
        return "dense", 1, False
    if fmt in ("int8", "w8a8_int8"):
        return fmt, 1, False
    return "int4", int(fmt.split("_g")[1].split("_")[0]), fmt.endswith("zero")


def make_weights(fmt: str, n: int, k: int, copies: int,
                 dev: str | None = None) -> tuple[list[tuple[torch.Tensor, dict]], int]:
    """`copies` distinct weights of the format, as gemv's (weight, quant kwargs); bytes of one."""
    quant, group, zero = fmt_quant(fmt)
    dev = dev or DEVICE
    out = []
    for _ in range(copies):
        if quant != "int4":
            codes = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
            scale = torch.rand(n, device=dev) * 1e-3 + 1e-4
            out.append((codes, {"quant": fmt, "scale": scale}))
        else:
            packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
            scale = torch.rand(n, k // group, device=dev) * 1e-2 + 1e-3
            zp = torch.randint(-8, 8, (n, k // group), device=dev).float() if zero else None
            out.append((packed, {"quant": "int4", "scale": scale, "zero": zp}))
    w, q = out[0]
    nbytes = w.numel() * w.element_size() + sum(t.numel() * t.element_size() for t in (q["scale"], q.get("zero"))
                                                if t is not None)
    return out, nbytes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Case:
    """One (format, shape, M): its weight copies, input tensors and the gemv call of the engine's fusion."""

    def __init__(self, fmt: str, shape: str, m: int, weights: list, nbytes: int) -> None:
        self.fmt, self.shape, self.m = fmt, shape, m
        self.n, self.k, self.fusion = SHAPES[shape]
        self.quant, self.group, _ = fmt_quant(fmt)
        self.weights, self.bytes = weights, nbytes
        self.n_out = self.n // 2 if self.fusion == "swiglu" else self.n
        dev, dt = DEVICE, torch.bfloat16
        self.x = torch.randn(m, self.k, device=dev, dtype=dt)
        self.nw = torch.ones(self.k, device=dev, dtype=dt)
        # The residual stream the timed launches add into in place (it grows with every replay), and
        # a zero one for the checks, whose output is then the matmul part alone: subtracting the
        # grown residual in bf16 lost 2% and refused good configs (H200 sweep, this session).
        self.res = torch.randn(m, self.n_out, device=dev, dtype=dt)
        self.res_check = torch.zeros_like(self.res)

    def call(self, w: torch.Tensor, q: dict, **kw: Any) -> torch.Tensor:
        """The fused gemv into a new tensor (the residual stream left as it is)."""
        if self.fusion == "residual":
            return gemv(self.x, w, residual=self.res_check, **q, **kw)
        return gemv(self.x, w, norm_weight=self.nw, swiglu=self.fusion == "swiglu", **q, **kw)

    def run(self, w: torch.Tensor, q: dict, **kw: Any) -> None:
        """The fused gemv as the engine launches it (residual: added in place)."""
        if self.fusion == "residual":
            gemv(self.x, w, residual=self.res, out=self.res, **q, **kw)
        else:
            gemv(self.x, w, norm_weight=self.nw, swiglu=self.fusion == "swiglu", **q, **kw)

    def time(self, **kw: Any) -> float:
        """Seconds per launch over all weight copies in one CUDA graph, after a check that this
        launch computes what the exact heuristic's does (to bf16 and summation order; a residual
        add checked on a zero residual: the matmul part)."""
        w, q = self.weights[0]
        err = _rel(self.call(w, q, **kw).float(), self.call(w, q).float())
        if not err < 2e-2:
            raise ValueError(f"{kw} differs from the exact heuristic's result: relative error {err:.3g}")
        for w, q in self.weights[:2]:
            self.run(w, q, **kw)
        return graph_seconds(lambda: [self.run(w, q, **kw) for w, q in self.weights]) / len(self.weights)


def tinygemm_weights(case: Case) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """The case's int4 weight copies in tinygemm's layout for their device (kernels/quant_tinygemm.py:
    codes repacked, bf16 scales and zeros [G, N, 2]) and the bytes of one (codes + scales/zeros)."""
    pack = pack_for_gpu if case.x.is_cuda else pack_for_cpu
    packs = [(pack(w), scales_and_zeros(q["scale"], q["zero"], torch.bfloat16)) for w, q in case.weights]
    return packs, sum(t.numel() * t.element_size() for t in packs[0])


def tinygemm_check(case: Case, packs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raises unless tinygemm on the first copy computes the fp32 reference (to bf16)."""
    w, q = case.weights[0]
    err = _rel(tinygemm_mm(case.x, packs[0][0], case.group, packs[0][1]),
               ref.int4_linear_fast_ref(case.x, w, q["scale"], q["zero"]))
    if not err < 2e-2:
        raise ValueError(f"tinygemm differs from the reference: relative error {err:.3g}")


def tinygemm_seconds(case: Case, packs: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """aten._weight_int4pack_mm on the case's int4 codes (a plain matmul, no fusion), checked
    against the fp32 reference, seconds per launch over all copies in one CUDA graph."""
    packs = packs if packs is not None else tinygemm_weights(case)[0]
    tinygemm_check(case, packs)
    x = case.x

    def mm(i: int) -> torch.Tensor:
        return tinygemm_mm(x, packs[i][0], case.group, packs[i][1])

    mm(1)
    return graph_seconds(lambda: [mm(i) for i in range(len(packs))]) / len(packs)


def copy_ceiling_tbps() -> float:
    """Device-to-device copy bandwidth (read + write) of 1 GiB, TB/s: the ceiling a GEMV's reads are held to."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
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


class Records:
    """A sweep's JSON lines: each printed, appended to ``path`` when given, and the "measure" ones
    kept in ``records`` for the summaries; the first line is the device's copy ceiling."""

    def __init__(self, path: str | None, device: str, ceiling: float) -> None:
        self.records: list[dict] = []
        self.out = open(path, "w") if path else None
        self.ceiling = ceiling
        self.emit({"kind": "ceiling", "device": torch.cuda.get_device_name() if device == "cuda" else device,
                   "copy_TBps": ceiling, "torch": torch.__version__})

    def emit(self, rec: dict) -> None:
        if rec.get("kind") == "measure":
            self.records.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


def suggest(records: list[dict], fmt: str) -> dict | None:
    """The FAST_M1_CONFIGS entry of the least total time over the shapes, among the entries timed
    on every shape the format's M == 1 records have (heuristic included), or None."""
    timed = [r for r in records if r.get("kind") == "measure" and r["format"] == fmt and r["M"] == 1
             and r["path"] in ("fast", "fast_sweep") and "seconds" in r]
    shapes = {r["shape"] for r in timed}
    per_entry: dict[tuple, dict] = {}
    for r in timed:
        per_entry.setdefault(tuple(r["entry"]), {})[r["shape"]] = r["seconds"]
    totals = {e: sum(t.values()) for e, t in per_entry.items() if set(t) == shapes}
    if not totals:
        return None
    best = min(totals, key=totals.get)
    heuristic = tuple(FAST_M1_CONFIGS[fmt_quant(fmt)[0]])
    return {"kind": "suggest", "format": fmt, "entry": list(best), "total_us": totals[best] * 1e6,
            "heuristic_entry": list(heuristic),
            "heuristic_total_us": totals[heuristic] * 1e6 if heuristic in totals else None,
            "shapes": sorted(shapes)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16], help="batch rows (1..16)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="seconds of fast-config sweeping after the fixed measurements (each new config compiles)")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quant_gemv_sweep needs a CUDA GPU")
    started = time.perf_counter()
    log = Records(args.json, DEVICE, copy_ceiling_tbps())
    records, emit, ceiling = log.records, log.emit, log.ceiling

    def measure(case: Case, path: str, seconds: Callable[[], float], nbytes: int, **extra: Any) -> None:
        rec = {"kind": "measure", "format": case.fmt, "shape": case.shape, "M": case.m, "N": case.n, "K": case.k,
               "fusion": case.fusion if path != "tinygemm" else "none", "path": path, "weight_bytes": nbytes, **extra}
        try:
            s = seconds()
            gbps = nbytes / s / 1e9
            rec.update(seconds=s, us=s * 1e6, GBps=gbps, of_copy_ceiling=gbps / (ceiling * 1e3))
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects, a torch without tinygemm
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        emit(rec)

    # bf16 baselines, per shape and M
    for shape in args.shapes:
        n, k, fusion = SHAPES[shape]
        copies = max(8, -(-COPY_BYTES // (n * k * 2)))
        dense = [(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02, {}) for _ in range(copies)]
        for m in args.m:
            case = Case("bf16", shape, m, dense, n * k * 2)
            cfg = gemv_config(m, case.n_out, k, two=fusion == "swiglu")
            measure(case, "bf16", lambda: case.time(), n * k * 2, config=list(cfg))
        del dense
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # the fixed measurements of every case, keeping the M == 1 cases for the sweep
    sweep: list[tuple[Case, list]] = []
    for fmt in args.formats:
        for shape in args.shapes:
            n, k, fusion = SHAPES[shape]
            quant, group, _ = fmt_quant(fmt)
            code_bytes = n * k if quant != "int4" else n * k // 2
            weights, nbytes = make_weights(fmt, n, k, max(8, -(-COPY_BYTES // code_bytes)))
            for m in args.m:
                case = Case(fmt, shape, m, weights, nbytes)
                two = fusion == "swiglu"
                heuristic = gemv_config(m, case.n_out, k, two=two)
                measure(case, "exact", lambda: case.time(), nbytes, config=list(heuristic))
                if m > 1 and quant == "int8":
                    for tile in (t for t in EXACT_TILES if t != heuristic):
                        measure(case, "exact_sweep", lambda: case.time(config=tile), nbytes, config=list(tile))
                    for tile, split in EXACT_SPLITS:
                        measure(case, "exact_split", lambda: case.time(config=tile, split_k=split), nbytes,
                                config=list(tile), split_k=split)
                if m == 1:
                    entry = FAST_M1_CONFIGS[quant]
                    cfg = fast_gemv_config(case.n_out, k, quant, group, two)
                    measure(case, "fast", lambda: case.time(fast=True), nbytes, config=list(cfg), entry=list(entry))
                    sweep.append((case, [e for e in FAST_CANDIDATES if e != entry]))
                if quant == "int4":
                    measure(case, "tinygemm", lambda: tinygemm_seconds(case), nbytes)
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            del weights

    # the sweep: candidate-major, so that a spent budget leaves whole candidates timed on every shape
    sweep_start = time.perf_counter()
    for entry in FAST_CANDIDATES:
        if time.perf_counter() - sweep_start >= args.budget_s:
            break
        for case, todo in sweep:
            if entry not in todo or time.perf_counter() - sweep_start >= args.budget_s:
                continue
            cfg = fast_gemv_config(case.n_out, case.k, case.quant, case.group, case.fusion == "swiglu", entry=entry)
            measure(case, "fast_sweep", lambda: case.time(fast=True, config=cfg), case.bytes, config=list(cfg),
                    entry=list(entry))
    for case, _ in sweep:  # the best fast config of each case, heuristic included
        timed = [r for r in records if r["format"] == case.fmt and r["shape"] == case.shape and r["M"] == 1
                 and r["path"] in ("fast", "fast_sweep") and "seconds" in r]
        if timed:
            best = min(timed, key=lambda r: r["seconds"])
            emit({**best, "path": "fast_best", "of_candidates": len(timed)})
    for fmt in args.formats:
        rec = suggest(records, fmt)
        if rec is not None:
            emit(rec)
    emit({"kind": "done", "wall_s": time.perf_counter() - started})
    log.close()


if __name__ == "__main__":
    main()
