"""Round-to-nearest weight quantization with min/max scales (no data). Zero is on every grid, so
pruned weights stay zero."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from shrink.compress.methods import register_method
from shrink.compress.methods.base import WeightQuantizer
from shrink.compress.quant import QuantizedWeight, rtn


@register_method("rtn")
@dataclass
class RTN(WeightQuantizer):
    needs_data: ClassVar[bool] = False

    def quantize_weight(self, weight: torch.Tensor, stat: None, keep: torch.Tensor | None) -> QuantizedWeight:
        return rtn(weight * keep if keep is not None else weight, self.scheme)
