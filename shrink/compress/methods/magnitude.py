"""Magnitude pruning (the baseline): drop the smallest |w| of each row or N:M group; no data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from shrink.compress.methods import register_method
from shrink.compress.methods.base import Pruner
from shrink.compress.sparsity import magnitude_prune


@register_method("magnitude")
@dataclass
class Magnitude(Pruner):
    needs_data: ClassVar[bool] = False

    def keep_mask(self, weight: torch.Tensor, stat: None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = magnitude_prune(weight, self.spec)
        return weight.float() * keep, keep
