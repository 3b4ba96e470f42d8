"""Whether a loaded model's weight-only compressed linears (int8, int4) stay compressed or are
dequantized once into dense linears of the model's dtype (ModelOptions.compressed_weights).

"keep" serves the codes (engine/layers/quantized.py); "dequantize" fills the model's dense linears at
load (the loader's keep_compressed off: the CPU path); "auto" dequantizes on the CPU and, on a GPU,
keeps the codes unless a dense weight decodes faster. Reading 2-4x fewer bytes pays where a decode
step is bound by weight bytes (a 7B model); on a small one the step is bound by launches and each
linear's own work, and there the compressed GEMVs can lose: on SmolLM2-135M's 576-wide layers the
int4 model decoded at 0.86-0.90x its bf16 form at batch 1 and 0.72x at 16 (H200, BENCHMARKS.md,
twenty-third session). So after loading (and after the int4 kernel choice, engine/layers/int4_kernel.py)
"auto" times each decoder layer's compressed linears as the decode runs them (the fused GEMV, or the
module where the GEMVs cannot read it) against the same GEMV on their dequantized weight, at 1 and at
SMALL_M rows, and dequantizes only where the dense weights are faster at both, by MIN_GAIN at one row.
The choice and its times are logged. It is skipped (codes kept) where the dense weights would take
more than MAX_DENSE_FRACTION of the device's memory, and under tensor parallelism (the ranks would
have to agree). The checkpoint on disk is unchanged; what the dequantized model gives up is GPU
memory (the dense weights' bytes), not accuracy beyond the dequantization it already does.
Only the decoder layers' linears are considered: a compressed lm_head keeps its form.
W8A8 (activations quantized at run time) and 2:4 (engine/layers/sparse24.py times its own paths)
are out of scope.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from kernels import decode_gemv
from kernels.gemv import SMALL_M

from engine.layers.quantized import Int4Linear, Int8Linear, gemv_weight, set_submodule

log = logging.getLogger("engine.weights")

MIN_GAIN = 1.03  # dense must be this much faster at one row (timing noise must not flip a tie)
MAX_DENSE_FRACTION = 0.1  # of the device's memory the dense weights may take
TIMED_LAYERS = 4  # layers of one shape timed back to back (distinct weights, as a forward reads them)
WEIGHT_ONLY = (Int8Linear, Int4Linear)


Timer = Callable[[Callable[[], object], str, int], float]


def _seconds(run: Callable[[], object], form: str, rows: int) -> float:
    """Device seconds of run() (the matmuls of `rows` rows of one `form`, "compressed" or "dense")
    replayed from a CUDA graph, as the engine's decode runs: the best of 3."""
    from engine.cuda_graphs import device_seconds  # engine.cuda_graphs imports the runner's modules

    return device_seconds(run, graph=True, warmup=1, repeats=3, reduce=min)


def _device_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def _can_time(device: torch.device) -> bool:
    """Whether the layers are where _seconds times them (a GPU; on the CPU "auto" is the loader's dequantization)."""
    return device.type == "cuda"


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder layers' weight-only compressed linears by name (lm_head and the rest excluded)."""
    layers = model.model.layers
    return {f"model.layers.{name}": m for name, m in layers.named_modules() if isinstance(m, WEIGHT_ONLY)}


def _decode_call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None) -> Callable[[], object]:
    """One matmul of x as the decode runs it: the fused GEMV kernel on the layer's format (or on
    `weight`, a dense candidate), else the layer's own forward (int4 on tinygemm, per-group int8)."""
    args = (weight, {}) if weight is not None else gemv_weight(layer)
    if args is None:
        return lambda: layer(x)
    w, quant = args
    return lambda: decode_gemv.gemv(x, w, layer.bias, **quant, pdl=layer.pdl)


def _times(groups: dict[tuple, list[nn.Module]], rows: int, dtype: torch.dtype, seconds: Timer) -> tuple[float, float]:
    """(compressed, dense) seconds of every layer's matmul of `rows` rows: per shape, TIMED_LAYERS
    of its layers back to back, scaled to the shape's count."""
    compressed = dense = 0.0
    for same in groups.values():
        timed = same[:TIMED_LAYERS]
        x = torch.randn(rows, timed[0].in_features, dtype=dtype, device=timed[0].scale.device)
        weights = [m.dequantized().to(dtype).contiguous() for m in timed]
        scale = len(same) / len(timed)
        calls = [_decode_call(m, x) for m in timed]
        compressed += scale * seconds(lambda: [c() for c in calls], "compressed", rows)
        calls = [_decode_call(m, x, w) for m, w in zip(timed, weights)]
        dense += scale * seconds(lambda: [c() for c in calls], "dense", rows)
        del weights
    return compressed, dense


def choose_weight_form(model: nn.Module, dtype: torch.dtype) -> str | None:
    """Apply ModelOptions.compressed_weights "auto" to a loaded model (activations of `dtype`):
    returns "compressed" or "dense" (the layers then replaced by nn.Linear with their dequantized
    weights), None without weight-only compressed decoder linears. "keep" and "dequantize" were
    the loader's to apply: they return "compressed" here, as does "auto" off a GPU (layers loaded
    compressed on the CPU by keep_compressed). The GPU's timer and memory size are this module's
    _seconds, _device_bytes and _can_time (tests replace them)."""
    layers = compressed_layers(model)
    if not layers:
        return None
    options = model.options
    if options.compressed_weights != "auto" or options.tp_size > 1 or not options.use_triton:
        return "compressed"
    device = next(iter(layers.values())).scale.device
    if not _can_time(device):
        return "compressed"
    extra = sum(m.out_features * m.in_features for m in layers.values()) * torch.finfo(dtype).bits // 8
    limit = MAX_DENSE_FRACTION * _device_bytes(device)
    if extra > limit:
        log.info("compressed_weights auto: keeping the codes (their dense weights would take %.2f GB, over %.0f%% "
                 "of the device's memory)", extra / 1e9, MAX_DENSE_FRACTION * 100)
        return "compressed"
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for m in layers.values():
        groups[(type(m).__name__, m.out_features, m.in_features, m.group_size, getattr(m, "zero", None) is not None,
                gemv_weight(m) is None)].append(m)
    with torch.no_grad():
        one = _times(groups, 1, dtype, _seconds)
        many = _times(groups, SMALL_M, dtype, _seconds)
    dense = one[1] * MIN_GAIN <= one[0] and many[1] <= many[0]
    log.info("compressed_weights auto: %s (the %d compressed decoder linears' matmuls, compressed / dense: "
             "1 row %.1f / %.1f us, %d rows %.1f / %.1f us)", "dense" if dense else "compressed", len(layers),
             one[0] * 1e6, one[1] * 1e6, SMALL_M, many[0] * 1e6, many[1] * 1e6)
    if not dense:
        return "compressed"
    dequantize_layers(model, layers, dtype)
    log.info("compressed_weights auto: dequantized into %.1f MB of %s weights (the checkpoint keeps its codes)",
             extra / 1e6, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "dense"


@torch.no_grad()
def dequantize_layers(model: nn.Module, layers: dict[str, nn.Module], dtype: torch.dtype) -> None:
    """Replace each named compressed linear by an nn.Linear holding its dequantized weight (and bias)."""
    for name, m in layers.items():
        weight = m.dequantized().to(dtype)
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=dtype)
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if m.bias is not None:
            dense.bias = nn.Parameter(m.bias.to(dtype).clone(), requires_grad=False)
        set_submodule(model, name, dense)
