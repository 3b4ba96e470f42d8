"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha), folded as x/s into the producer (RMSNorm) and W*s
into the consumers, for the two norm -> linears mappings of each block (attention inputs, MLP
inputs), as the paper does for the LayerNorm-fed linears.
"""

from __future__ import annotations

import torch
from torch import nn


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
