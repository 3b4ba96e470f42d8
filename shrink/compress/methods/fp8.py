"""fp8 e4m3 weights (one scale per output channel) with dynamic per-token fp8 activations (no data;
the scheme's bits and group size do not apply)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import SettingError, ShrinkError
from shrink.compress.methods import register_method
from shrink.compress.methods.base import WeightQuantizer
from shrink.compress.quant import fp8_weight


@register_method("fp8")
@dataclass
class FP8(WeightQuantizer):
    needs_data: ClassVar[bool] = False
    activations: str | None = "fp8"

    def misfit(self, linear: nn.Linear) -> SettingError | None:
        return None

    def check_device(self, device: torch.device) -> None:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ShrinkError("fp8 needs a GPU with fp8 (compute capability 8.9+)")

    def quantize_weight(self, weight: torch.Tensor, stat: None,
                        keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_weight(weight)
