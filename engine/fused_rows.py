"""How many decode rows take the fused small-batch path (EngineConfig.fused_decode_rows).

The fused path (LlamaModel.forward: rows <= ``fused_rows`` run ``forward_fused``, Triton GEMVs
with the norms, rope and SwiGLU fused in) was built for batch 1, where a small model's step is
launch bound and a fused GEMV takes 2.1-4.1 us against cuBLAS's 3.5-4 us. It does not win at
every size: on an H200 a Llama-2-7B shape (random bf16 weights, eval/bench/quant.py) decoded
2,424 tok/s at batch 16 fused and 3,230 tok/s unfused (cuBLAS), 1.33x; since the norm runs apart
at M > 1 on large weights, launched without PDL there (kernels/gemv.py separate_norm, large_rows),
the bf16 and int8 fused forwards win at every bucket to 16 rows (16 rows: 4,217 against 4,470 us;
int8 3,212 against 3,399), while int4's loses from 2 rows (5,186 against 3,956; BENCHMARKS.md,
sixteenth session). So where nothing pins it,
the runner times the decode forward both ways at each decode graph bucket up to the rows the
weights allow, on a GPU, before any CUDA graph is captured (a graph bakes in the path it recorded;
the verify paths' timing and the multi-step graphs come after too), and keeps the largest bucket
up to which the fused forward wins at every bucket.

Not timed: on the CPU, with batch_invariant (every forward must run the fused kernels) and under
tensor parallelism (every rank must take the same path, and timings differ per rank); there the
limit stays what the weights allow (kernels.gemv.SMALL_M, 1 with 2:4 + int4, 0 where the kernels
cannot read a linear).

The timed forward is the runner's eager decode forward (forward and LM head) over the decode
staging buffer as graph capture leaves it: padding rows that store nothing (slot -1) and attend
to one token. Attention is the same kernels on either path, so the difference is the matmuls'.
With CUDA graphs each candidate is replayed from a graph of its own (median of several replays,
cuda_graphs.device_seconds); with enforce_eager it runs eagerly, host gaps included, as the
engine will."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from engine.cuda_graphs import decode_buckets, device_seconds
from kernels.gemv import MAX_NORM_K

log = logging.getLogger("engine.fused_rows")


def decode_forward_us(runner: Any, rows: int, graphed: bool) -> float:
    """Device microseconds of the runner's eager decode forward of `rows` rows (the module docstring's
    timing: a graph replay with CUDA graphs, eager otherwise)."""
    return device_seconds(functools.partial(runner.eager_decode_forward, rows), graphed) * 1e6


def choose_fused_rows(us: dict[int, dict[str, float]]) -> int:
    """The largest bucket b such that the fused forward was faster than the unfused one at every
    timed bucket <= b; 0 where it loses at the smallest. ``us``: bucket -> {"fused", "unfused"}."""
    rows = 0
    for b in sorted(us):
        if us[b]["fused"] >= us[b]["unfused"]:
            break
        rows = b
    return rows


def set_fused_rows(runner: Any, max_rows: int, graphed: bool) -> dict[int, dict[str, float]]:
    """Set ``runner.model.model.fused_rows`` for this engine: pinned by fused_decode_rows (within
    what the weights allow), else timed where that applies (see the module docstring). Returns the
    timings, bucket -> {"fused": us, "unfused": us} ({} where nothing was timed). ``max_rows``: the
    most rows a decode forward takes (the largest decode graph bucket with graphs); ``graphed``:
    decode replays CUDA graphs."""
    config, model = runner.config, runner.model.model
    cap = model.fused_rows  # what load_weights / update_fusable allow
    if config.fused_decode_rows is not None:
        model.fused_rows = min(cap, config.fused_decode_rows)
        return {}
    fused = model.fused_decode and model.fusable and config.hf_config.hidden_size <= MAX_NORM_K
    if (runner.device.type != "cuda" or config.batch_invariant or config.tensor_parallel_size > 1
            or not fused or cap == 0):
        return {}
    us: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for b in (b for b in decode_buckets(max_rows) if 1 <= b <= cap):
            us[b] = {}
            for path, rows in (("fused", cap), ("unfused", 0)):
                model.fused_rows = rows
                us[b][path] = decode_forward_us(runner, b, graphed)
    model.fused_rows = choose_fused_rows(us)
    log.info("fused decode up to %d rows (of %d); us fused/unfused per bucket: %s", model.fused_rows, cap,
             ", ".join(f"{b}: {t['fused']:.1f}/{t['unfused']:.1f}" for b, t in us.items()))
    return us
