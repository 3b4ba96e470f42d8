"""The three kinds of compression method and what each shares.

- `Pruner`: zeroes weights to a sparsity structure (`spec`); records each linear's keep mask.
- `Transform`: rescales weights and the ops feeding them in full precision so that the function is
  unchanged but the weights quantize better (SmoothQuant, AWQ); a quantizer must follow it.
- `WeightQuantizer`: swaps each linear for a QuantLinear with `scheme`'s codes; the last method of a
  quantization recipe. Zeros of a sparse input (the driver's `report.masks`) stay exactly zero.

A subclass implements `new_stat` (what to gather from a linear's inputs, or None) and the one
per-weight step (`keep_mask`, `rescale`, `quantize_weight`); the loops over a group live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from common.errors import SettingError
from shrink.compress.calibration import Report, Stat
from shrink.compress.modules import QuantLinear, set_module
from shrink.compress.quant import QuantizedWeight, QuantSpec
from shrink.compress.sparsity import SparsitySpec, sparsity


@dataclass
class CompressionMethod:
    name: ClassVar[str]             # set by @register_method
    kind: ClassVar[str]
    needs_data: ClassVar[bool] = True
    true_sequential: bool = True    # calibrate o after q/k/v, down after gate/up within a block

    def misfit(self, linear: nn.Linear) -> SettingError | None:
        """Why this method cannot compress `linear` (naming the setting), or None."""
        return None

    def check_device(self, device: torch.device) -> None:
        """Raise a ShrinkError when `device` cannot run this method (checked before any work)."""

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Stat | None:
        return None

    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
              report: Report) -> None:
        raise NotImplementedError


@dataclass
class Pruner(CompressionMethod):
    kind: ClassVar[str] = "prune"
    spec: SparsitySpec = field(default_factory=SparsitySpec)

    def misfit(self, linear: nn.Linear) -> SettingError | None:
        if self.spec.fits(linear.in_features):
            return None
        return SettingError("structure", f"{self.spec.structure} needs in_features divisible by "
                                         f"{self.spec.nm[1]} (got {linear.in_features})")

    def keep_mask(self, weight: torch.Tensor, stat: Stat | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight [out, in] fp32 with the pruned entries zero, keep mask)."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
              report: Report) -> None:
        report.sparsity_structure = self.spec.structure
        for name in names:
            w = block.get_submodule(name).weight
            new, keep = self.keep_mask(w, stats.get(name))
            w.copy_(new.to(w.dtype))
            full = f"{prefix}.{name}"
            report.masks[full] = keep.cpu()
            report.layers[full] = {"sparsity": sparsity(w)}


@dataclass
class Transform(CompressionMethod):
    kind: ClassVar[str] = "transform"
    activations: ClassVar[str | None] = None  # what the quantizer after it must do to activations
    scheme: QuantSpec = field(default_factory=QuantSpec)

    def __post_init__(self) -> None:
        self.true_sequential = False  # scales are searched on the whole block's inputs at once

    def check_quantizer(self, quantizer: "WeightQuantizer") -> None:
        """Raise a SettingError when `quantizer` cannot follow this transform."""


@dataclass
class WeightQuantizer(CompressionMethod):
    kind: ClassVar[str] = "quantize"
    scheme: QuantSpec = field(default_factory=QuantSpec)
    activations: str | None = None  # None | int8 | fp8: dynamic per-token activation quantization

    def misfit(self, linear: nn.Linear) -> SettingError | None:
        if self.scheme.fits(linear.in_features):
            return None
        return SettingError("group_size", f"{self.scheme.group_size} does not divide in_features="
                                          f"{linear.in_features}")

    def quantize_weight(self, weight: torch.Tensor, stat: Stat | None,
                        keep: torch.Tensor | None) -> QuantizedWeight | tuple[torch.Tensor, torch.Tensor]:
        """Quantize one weight [out, in]: integer codes, or (fp8 codes, scale [out, 1]). Pruned
        entries (keep False) must come out exactly zero."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
              report: Report) -> None:
        for name in names:
            linear = block.get_submodule(name)
            full = f"{prefix}.{name}"
            w = linear.weight.detach()
            keep = report.masks.get(full)
            if keep is not None:
                keep = keep.to(w.device)
                if keep.shape != w.shape:
                    raise ValueError(f"sparsity mask of {full} has shape {tuple(keep.shape)}, weight {tuple(w.shape)}")
            out = self.quantize_weight(w, stats.get(name), keep)
            if isinstance(out, QuantizedWeight):
                new = QuantLinear.from_quantized(out, linear.bias, act=self.activations, dtype=w.dtype)
            else:
                new = QuantLinear(*out, None, None, linear.bias, act=self.activations, dtype=w.dtype)
            set_module(block, name, new.to(w.device))
            report.layers.setdefault(full, {})["rel_weight_error"] = float(
                (new.weight.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))


KINDS: dict[str, type[CompressionMethod]] = {"prune": Pruner, "transform": Transform, "quantize": WeightQuantizer}
