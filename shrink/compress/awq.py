"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales before weight quantization.

For each group of linears that read the same input, a scale s = mean|x|^r (normalised by
sqrt(max*min)) is searched over r in [0, 1) so that quantizing W*s and feeding x/s best
reproduces the group's fp outputs on calibration tokens. The 1/s is folded into the operation
that produces x (an RMSNorm weight, or the rows of a previous linear), so the model computes the
same function in full precision and only the rounding changes.
"""

from __future__ import annotations

import torch
from torch import nn

from shrink.compress.quant import QuantSpec, rtn


def fake_rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return rtn(w, spec).dequantize()


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, absmean: torch.Tensor,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale [in] for the linears `weights` fed by tokens x [T, in].
    Returns (scale, best ratio, relative output error at that ratio)."""
    w = torch.cat([t.float() for t in weights], dim=0)
    x = x.float()
    ref = x @ w.t()
    denom = ref.pow(2).mean().clamp(min=1e-12)
    best = (torch.ones_like(absmean), 0.0, float("inf"))
    for r in range(grid):
        ratio = r / grid
        s = absmean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_rtn(w * s.unsqueeze(0), spec) / s.unsqueeze(0)
        err = float((x @ wq.t() - ref).pow(2).mean() / denom)
        if err < best[2]:
            best = (s, ratio, err)
    return best


@torch.no_grad()
def fold_scale(prev: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """x -> x / s at the producer, W -> W * s at every consumer: the same function."""
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm-style module: y = weight * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for c in consumers:
        c.weight.mul_(s.unsqueeze(0).to(c.weight.dtype))


def block_mappings(block: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer, consumers) pairs of a Llama-family block whose scale can be folded exactly."""
    names = dict(block.named_modules())
    out = []
    candidates = [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.o_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),
    ]
    for prev, consumers in candidates:
        if prev not in names or not all(c in names for c in consumers):
            continue
        p = names[prev]
        if isinstance(p, nn.Linear) and p.out_features != names[consumers[0]].in_features:
            continue  # v -> o under GQA: v's outputs are shared across heads, no per-channel fold
        if not isinstance(p, nn.Linear) and not hasattr(p, "weight"):
            continue
        out.append((prev, consumers))
    return out
