"""Quantization methods as the sequential driver runs them: RTN, GPTQ, AWQ, SmoothQuant W8A8, fp8.

Each swaps the block's linears for QuantLinear modules as soon as they are quantized, so the next
group (and the next block) is calibrated on the outputs of the quantized model. `masks` (from a
pruned input) keep pruned weights exactly zero: RTN and AWQ preserve zeros by construction (zero
is on every grid), GPTQ is told the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.compress.awq import block_mappings, fold_scale, search_scale
from shrink.compress.calibration import Report, Stat
from shrink.compress.gptq import gptq_quantize
from shrink.compress.hessian import Hessian
from shrink.compress.modules import QuantLinear, set_module
from shrink.compress.quant import QuantizedWeight, QuantSpec, fp8_weight, rtn
from shrink.compress.smoothquant import norm_mappings, smooth_scale
from shrink.compress.stats import ActStats
from common.errors import ShrinkError

QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "fp8")


@dataclass
class QuantMethod:
    method: str
    spec: QuantSpec
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    awq_grid: int = 20
    awq_max_tokens: int = 65536
    alpha: float = 0.5
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ShrinkError(f"quantize.method must be one of {', '.join(QUANT_METHODS)} (got {self.method!r})")
        if self.method == "smoothquant" and not 0.0 <= self.alpha <= 1.0:
            raise ShrinkError(f"quantize.alpha must be in [0, 1] (got {self.alpha})")
        if self.method == "smoothquant" and (self.spec.bits != 8 or self.spec.group_size is not None):
            raise ShrinkError("quantize.method=smoothquant is W8A8: set quantize.bits=8 and quantize.group_size=null")
        if self.method in ("awq", "smoothquant"):
            self.true_sequential = False  # scales are searched on the whole block's fp inputs at once

    @property
    def needs_data(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant")

    @property
    def act(self) -> str | None:
        return {"smoothquant": "int8", "fp8": "fp8"}.get(self.method)

    def fits(self, linear: nn.Linear) -> bool:
        return self.method == "fp8" or self.spec.fits(linear.in_features)

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Stat | None:
        device = linear.weight.device
        if self.method == "gptq":
            return Hessian(linear.in_features, device)
        if self.method == "awq":
            return ActStats(linear.in_features, device, total_tokens, self.awq_max_tokens)
        if self.method == "smoothquant":
            return ActStats(linear.in_features, device)
        return None

    def _swap(self, block: nn.Module, name: str, linear: nn.Linear, qw: QuantizedWeight | None,
              codes_scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        if qw is not None:
            new = QuantLinear.from_quantized(qw, linear.bias, act=self.act, dtype=linear.weight.dtype)
        else:
            codes, scale = codes_scale
            new = QuantLinear(codes, scale, None, None, linear.bias, act=self.act, dtype=linear.weight.dtype)
        set_module(block, name, new.to(linear.weight.device))
        return new

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat], report: Report) -> None:
        if self.method == "awq":
            self._awq_scales(block, prefix, names, stats, report)
        elif self.method == "smoothquant":
            self._smooth(block, names, stats)
        for name in names:
            linear = block.get_submodule(name)
            full = f"{prefix}.{name}"
            w = linear.weight.detach()
            keep = self.masks.get(full)
            if keep is not None:
                keep = keep.to(w.device)
                if keep.shape != w.shape:
                    raise ShrinkError(f"sparsity mask of {full} has shape {tuple(keep.shape)}, weight {tuple(w.shape)}")
            if self.method == "fp8":
                self._swap(block, name, linear, None, fp8_weight(w))
                report.layers[full] = {"format": "fp8"}
                continue
            if self.method == "gptq":
                qw = gptq_quantize(w, stats[name].matrix(), self.spec, damp=self.damp, act_order=self.act_order,
                                   block_size=self.block_size, keep=keep)
            else:
                qw = rtn(w * keep if keep is not None else w, self.spec)
            new = self._swap(block, name, linear, qw)
            report.layers.setdefault(full, {})["rel_weight_error"] = float(
                (new.weight.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))

    def _awq_scales(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
                    report: Report) -> None:
        for prev, consumers in block_mappings(block):
            active = [c for c in consumers if c in names]
            if not active:
                continue
            st: ActStats = stats[active[0]]
            weights = [block.get_submodule(c).weight for c in active]
            s, ratio, err = search_scale(st.sample().to(weights[0].device), weights, self.spec,
                                         st.absmean.to(weights[0].device), self.awq_grid)
            fold_scale(block.get_submodule(prev), [block.get_submodule(c) for c in consumers], s)
            for c in active:
                report.layers.setdefault(f"{prefix}.{c}", {}).update({"awq_ratio": ratio, "awq_rel_err": err})

    def _smooth(self, block: nn.Module, names: list[str], stats: dict[str, Stat]) -> None:
        for prev, consumers in norm_mappings(block):
            if consumers[0] not in stats:
                continue
            weights = [block.get_submodule(c).weight for c in consumers]
            s = smooth_scale(stats[consumers[0]].absmax, weights, self.alpha)
            fold_scale(block.get_submodule(prev), [block.get_submodule(c) for c in consumers], s)
