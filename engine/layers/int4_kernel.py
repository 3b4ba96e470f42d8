"""Which kernel runs a loaded model's int4 weights on a GPU (ModelOptions.int4_kernel): our Triton
GEMVs, fused into the decode kernels, or torch's tinygemm (aten._weight_int4pack_mm), unfused.

One choice for the whole model: a single layer on tinygemm already takes the model off the fused
decode path (engine/models/llama.py's `fusable`). "auto" builds tinygemm's layout of every int4
layer (both layouts are held while it times: the int4 weights' memory twice, for the moment),
times every int4 matmul of one decode token on both kernels and logs the choice and the times;
the losing layout is freed. The
times cover the matmuls only, not the norm / residual / SwiGLU launches that the unfused path
adds (eval/bench/quant.py measures whole decode steps of each choice). Where tinygemm runs, the
prefill sizes PREFILL_ROWS are timed against dequantizing its layout + the dense GEMM too: tinygemm
keeps the sizes up to the first one where it loses. A tinygemm layer keeps only tinygemm's layout
of the codes (Int4Linear.use_tinygemm).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from kernels.gemv import SMALL_M

from engine.layers.quantized import Int4Linear

log = logging.getLogger("engine.int4")

PREFILL_ROWS = (32, 64, 128, 256)


def _seconds(run: Callable[[], object]) -> float:
    """Device seconds of run() replayed from a CUDA graph, as the engine runs decode (eager, the
    host's launch cost of a Triton kernel would be timed instead of the kernel): the best of 3."""
    from engine.cuda_graphs import device_seconds  # engine.cuda_graphs imports the runner's modules

    return device_seconds(run, graph=True, warmup=1, repeats=3, reduce=min)


def _shape(layer: Int4Linear) -> tuple:
    return layer.out_features, layer.in_features, layer.group_size, layer.zero is not None


def _total(shapes: dict[tuple, list[Int4Linear]], rows: int, path: str) -> float:
    """Seconds of every int4 layer's matmul of `rows` bf16 rows on one path: the layers of each
    shape back to back (distinct weights, as a forward reads them: not served from L2). Paths:
    "triton" (our GEMV, or dequantize + GEMM past SMALL_M), "tinygemm", "dequant" (the weight
    dequantized from tinygemm's layout, then the dense GEMM: tinygemm layers past their rows)."""
    max_m = {"triton": 0, "tinygemm": rows, "dequant": rows - 1}[path]
    total = 0.0
    for same in shapes.values():
        x = torch.randn(rows, same[0].in_features, dtype=torch.bfloat16, device=same[0].scale.device)
        before = [layer.tinygemm_max_m for layer in same]
        for layer in same:
            layer.tinygemm_max_m = max_m
        total += _seconds(lambda: [layer(x) for layer in same])
        for layer, m in zip(same, before):
            layer.tinygemm_max_m = m
    return total


def choose_int4_kernels(model: nn.Module, dtype: torch.dtype) -> str | None:
    """Set up every Int4Linear of `model` (activations of `dtype`) for its options' int4_kernel,
    after loading, on its device; returns the kernel chosen ("triton" / "tinygemm"), None without
    int4 layers. Raises ValueError naming int4_kernel where "tinygemm" was asked for and the model
    cannot run it."""
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not int4:
        return None
    if all(m.packed is None for m in int4):  # chosen before (tinygemm's layout is all that is left)
        return "tinygemm"
    asked = int4[0].int4_kernel
    unfit = next((m for m in int4 if not m.tinygemm_fits()), None)
    if asked == "tinygemm" and dtype != torch.bfloat16:
        raise ValueError(f"int4_kernel: 'tinygemm' runs bfloat16 activations only, the model's dtype is {dtype}")
    if asked == "tinygemm" and unfit is not None:
        raise ValueError(f"int4_kernel: 'tinygemm' cannot run an int4 layer of {unfit.out_features} x "
                         f"{unfit.in_features} with groups of {unfit.group_size} on {unfit.scale.device} "
                         "(it needs an SM 8.0+ GPU, out_features % 8 == 0, in_features % 32 == 0 and "
                         "groups of 32, 64, 128 or 256)")
    if asked == "triton" or (asked == "auto" and (unfit is not None or not int4[0].use_triton
                                                 or dtype != torch.bfloat16)):
        for m in int4:
            m.drop_tinygemm()
        return "triton"
    shapes: dict[tuple, list[Int4Linear]] = defaultdict(list)
    for m in int4:
        shapes[_shape(m)].append(m)
    with torch.no_grad():
        if asked == "auto":
            for m in int4:
                m.build_tinygemm()
            times = {path: _total(shapes, 1, path) for path in ("triton", "tinygemm")}
            log.info("int4_kernel auto: %s (int4 matmuls of one decode token: triton %.1f us, tinygemm %.1f us)",
                     min(times, key=times.get), times["triton"] * 1e6, times["tinygemm"] * 1e6)
            if times["triton"] <= times["tinygemm"]:
                for m in int4:
                    m.drop_tinygemm()
                torch.cuda.empty_cache()  # before the runner sizes the KV cache from the free memory
                return "triton"
        for m in int4:  # one layer at a time: its own codes freed as its tinygemm layout is made
            m.use_tinygemm()
        max_m = _tinygemm_max_rows(shapes)
    for m in int4:
        m.tinygemm_max_m = max_m
    torch.cuda.empty_cache()
    return "tinygemm"


def _tinygemm_max_rows(shapes: dict[tuple, list[Int4Linear]]) -> int:
    """The most rows tinygemm keeps: SMALL_M (the decode batches), then each of PREFILL_ROWS
    while tinygemm times faster than dequantizing its layout + the dense GEMM there."""
    max_m = SMALL_M
    for rows in PREFILL_ROWS:
        tiny, dense = _total(shapes, rows, "tinygemm"), _total(shapes, rows, "dequant")
        log.info("int4 prefill of %d rows: tinygemm %.1f us, dequantize + GEMM %.1f us", rows, tiny * 1e6, dense * 1e6)
        if tiny >= dense:
            break
        max_m = rows
    return max_m
