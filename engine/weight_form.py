"""Whether a model's weight-only compressed linears (int8, int4, 2:4 and 2:4 + int4) are served as their
codes or dequantized once into dense linears of the model's dtype (EngineConfig.compressed_weights).

"keep" serves the codes (engine/layers/quantized.py); "dequantize" fills the model's dense linears at
load (the loader's keep_compressed off, as the CPU always does); "auto" dequantizes at load where
nothing can time the two forms (the CPU), and on a GPU loads the codes, then times the runner's
decode forward both ways and keeps the faster. Reading 2-4x fewer bytes pays where a decode step is
bound by weight bytes (a 7B model: int4 g128 1.39x bf16 at batch 1); a small model's step is bound by
launches and each linear's own work, and there the codes lose: at SmolLM2-135M's shape the int4 g64
model decoded 0.89x and the int8 0.80x its bf16 form at batch 1, both 0.66x at batch 16 (H200,
eval/bench/quant.py, BENCHMARKS.md twenty-fourth session). Timing the linears one by one does not
see it: the same lease timed the 120 decoder matmuls of one token at 320.4 us as int4 codes and
321.1 us dense, while the whole fused forward took 425-427 us against bf16's 384-386. So "auto" times
what the engine runs, as engine/fused_rows.py does (and before it: the fused rows are then timed on
the form kept): the runner's eager decode forward at 1 and at SMALL_M rows (or the most it
decodes), replayed from a CUDA graph, each form at its best of the fused and unfused paths. Dense is
kept where it is faster at both, by MIN_GAIN at one row; the choice and the times are logged, and a
timing that fails leaves the codes with a warning (the choice is an optimisation). Measured in the
twenty-fifth session (H200, eval.bench.quant --compressed-weights auto): SmolLM2-shaped int8 and int4 g64
went dense (decode forward at 1 / 16 rows: int8 493 / 931 us as codes against 386 / 735 dense, int4 427 /
987 against 383 / 733) and decoded at 0.96-1.04x bf16 at batch 1-64, where their codes had decoded at
0.51-0.90x. 2:4 layers (Sparse24Linear, 16-bit kept values or int4 codes) are chosen the same way: each
times its own paths per linear at first use (engine/layers/sparse24.py), which does not see the forward
either (the 15-layer 2:4 + int4 student of `experiment=smallest` decoded at 0.83x / 0.32x the teacher at
batch 16 / 64, its dense GQA parent at 1.61x / 1.54x). Codes stay, untimed, where the
dense weights would take more than MAX_DENSE_FRACTION of the device or a quarter of the memory left
after the KV cache, and under tensor parallelism (the ranks would have to agree).
The checkpoint on disk keeps its codes; a model served dense holds its 16-bit weights in GPU memory.
Only the decoder layers' linears are considered: a compressed lm_head keeps its form. W8A8
(activations quantized at run time) is out of scope.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kernels.gemv import SMALL_M

from engine.fused_rows import decode_forward_us
from engine.layers.quantized import Int4Linear, Int8Linear, set_submodule
from engine.layers.sparse24 import Sparse24Linear

log = logging.getLogger("engine.weights")

MIN_GAIN = 1.03  # dense must be this much faster at one row (timing noise must not flip a tie)
MAX_DENSE_FRACTION = 0.1  # of the device's memory the dense weights may take
WEIGHT_ONLY = (Int8Linear, Int4Linear, Sparse24Linear)


def _can_time(device: torch.device) -> bool:
    """Whether "auto" can time the two forms here (a GPU); elsewhere it dequantizes at load."""
    return device.type == "cuda"


def load_compressed(form: str, device: torch.device) -> bool:
    """Whether the loader keeps the codes (keep_compressed) for compressed_weights `form` on `device`."""
    return form == "keep" or (form == "auto" and _can_time(device))


def _memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device."""
    return torch.cuda.mem_get_info(device)


_forward_us = decode_forward_us  # the decode forward's device us, as fused_rows.py times it (tests replace it)


def _best_forward_us(runner: Any, rows: int, graphed: bool) -> float:
    """The decode forward of `rows` rows at its best: fused and unfused where the weights allow the fused
    kernels at that many rows (engine/fused_rows.py picks between them next), timed both ways."""
    model = runner.model.model
    cap = model.fused_rows
    paths = (cap, 0) if cap >= rows else (cap,)
    best = float("inf")
    for fused_rows in paths:
        model.fused_rows = fused_rows
        best = min(best, _forward_us(runner, rows, graphed))
    model.fused_rows = cap
    return best


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder layers' weight-only compressed linears by name (lm_head and the rest excluded)."""
    return {f"model.layers.{name}": m for name, m in model.model.layers.named_modules() if isinstance(m, WEIGHT_ONLY)}


@torch.no_grad()
def dense_like(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding a compressed layer's dequantized weight (and its bias) in `dtype`."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
    dense.weight = nn.Parameter(layer.dequantized().to(dtype).contiguous(), requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.to(dtype).clone(), requires_grad=False)
    return dense


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, m in modules.items():
        set_submodule(model, name, m)
    model.update_fused_rows()


def set_weight_form(runner: Any, max_rows: int, graphed: bool) -> dict[str, dict[int, float]]:
    """compressed_weights "auto" on the runner's loaded model (see the module docstring): returns the
    decode forward's microseconds, form -> {rows: us} ({} where nothing was timed); the model is left
    with the faster form. ``max_rows``: the most rows a decode forward takes."""
    config, model = runner.config, runner.model
    layers = compressed_layers(model)
    if (config.compressed_weights != "auto" or not layers or config.tensor_parallel_size > 1
            or not _can_time(runner.device)):
        return {}
    dtype = runner.dtype
    extra = sum(m.out_features * m.in_features for m in layers.values()) * dtype.itemsize
    free, total = _memory(runner.device)
    if extra > MAX_DENSE_FRACTION * total or 4 * extra > free:
        log.info("compressed_weights auto: codes kept, untimed (their dense weights would take %.2f GB: over %.0f%% "
                 "of the device's %.1f GB or a quarter of the %.2f GB free)", extra / 1e9, MAX_DENSE_FRACTION * 100,
                 total / 1e9, free / 1e9)
        return {}
    rows = sorted({1, min(SMALL_M, max(max_rows, 1))})
    us: dict[str, dict[int, float]] = {}
    try:
        with torch.inference_mode():
            us["codes"] = {b: _best_forward_us(runner, b, graphed) for b in rows}
        # Outside inference mode: the dense weights stay ordinary tensors (update_weights copies into them in place).
        _swap(model, {name: dense_like(m, dtype) for name, m in layers.items()})
        with torch.inference_mode():
            us["dense"] = {b: _best_forward_us(runner, b, graphed) for b in rows}
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # the choice is an optimisation: the codes are served
        _swap(model, layers)
        torch.cuda.empty_cache()
        log.warning("compressed_weights auto: codes kept, the timing failed (%s: %s)", type(e).__name__, e)
        return {}
    dense = us["dense"][1] * MIN_GAIN <= us["codes"][1] and all(us["dense"][b] <= us["codes"][b] for b in rows)
    log.info("compressed_weights auto: %s (decode forward us, codes / dense: %s; %d decoder linears, dense %.1f MB)",
             "dense" if dense else "codes", ", ".join(f"{b} rows {us['codes'][b]:.1f} / {us['dense'][b]:.1f}"
                                                     for b in rows), len(layers), extra / 1e6)
    if not dense:
        _swap(model, layers)  # the same modules back: their kernels' choices (int4_kernel) stand
    del layers
    torch.cuda.empty_cache()
    return us
