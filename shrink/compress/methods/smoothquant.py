"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha), folded as x/s into the producer (RMSNorm) and W*s
into the consumers, for the two norm -> linears mappings of each block (attention inputs, MLP
inputs), as the paper does for the LayerNorm-fed linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import SettingError
from shrink.compress.calibration import Report
from shrink.compress.fold import fold_scale
from shrink.compress.methods import register_method
from shrink.compress.methods.base import Transform, WeightQuantizer
from shrink.compress.stats import ActStats


@torch.no_grad()
def smooth_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.cat([w.float().abs() for w in weights], dim=0).amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


NORM_MAPPINGS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
]


def norm_mappings(block: nn.Module) -> list[tuple[str, list[str]]]:
    names = dict(block.named_modules())
    return [(p, cs) for p, cs in NORM_MAPPINGS if p in names and all(c in names for c in cs)]


@register_method("smoothquant")
@dataclass
class SmoothQuant(Transform):
    """W8A8: the quantizer after it (rtn, or gptq) quantizes weights to int8 per channel and
    activations to int8 per token."""

    activations: ClassVar[str | None] = "int8"
    alpha: float = 0.5   # migration strength

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise SettingError("smoothquant.alpha", f"must be in [0, 1] (got {self.alpha})")

    def check_quantizer(self, quantizer: WeightQuantizer) -> None:
        if quantizer.activations not in (None, self.activations):
            raise SettingError("recipe", f"smoothquant is W8A8 int8: {quantizer.name} cannot follow it")
        if quantizer.scheme.bits != 8 or quantizer.scheme.group_size is not None:
            raise SettingError("bits", "smoothquant is W8A8: set bits=8 and group_size=null")

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> ActStats:
        return ActStats(linear.in_features, linear.weight.device)

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, ActStats],
              report: Report) -> None:
        for prev, consumers in norm_mappings(block):
            if consumers[0] not in stats:
                continue
            weights = [block.get_submodule(c).weight for c in consumers]
            s = smooth_scale(stats[consumers[0]].absmax, weights, self.alpha)
            fold_scale(block.get_submodule(prev), [block.get_submodule(c) for c in consumers], s)
