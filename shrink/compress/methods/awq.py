"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales before weight quantization.

For each group of linears that read the same input, a scale s = mean|x|^r (normalised by
sqrt(max*min)) is searched over r in [0, 1) so that quantizing W*s and feeding x/s best
reproduces the group's fp outputs on calibration tokens. The 1/s is folded into the operation
that produces x (an RMSNorm weight, or the rows of a previous linear), so the model computes the
same function in full precision and only the rounding changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import SettingError
from shrink.compress.calibration import Report
from shrink.compress.fold import fold_scale
from shrink.compress.methods import register_method
from shrink.compress.methods.base import Transform
from shrink.compress.quant import QuantSpec, rtn
from shrink.compress.stats import ActStats


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


@register_method("awq")
@dataclass
class AWQ(Transform):
    """Searches the scales with the recipe's weight scheme; the quantizer after it (rtn for the
    paper's AWQ, or gptq) then quantizes the rescaled weights."""

    grid: int = 20              # ratios tried in [0, 1)
    max_tokens: int = 65536     # tokens kept per layer for the scale search loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise SettingError("awq.grid", f"must be >= 1 (got {self.grid})")
        if self.max_tokens < 1:
            raise SettingError("awq.max_tokens", f"must be >= 1 (got {self.max_tokens})")

    def misfit(self, linear: nn.Linear) -> SettingError | None:
        if self.scheme.fits(linear.in_features):
            return None
        return SettingError("group_size", f"{self.scheme.group_size} does not divide in_features="
                                          f"{linear.in_features}")

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> ActStats:
        return ActStats(linear.in_features, linear.weight.device, total_tokens, self.max_tokens)

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, ActStats],
              report: Report) -> None:
        for prev, consumers in block_mappings(block):
            active = [c for c in consumers if c in names]
            if not active:
                continue
            st = stats[active[0]]
            weights = [block.get_submodule(c).weight for c in active]
            s, ratio, err = search_scale(st.sample().to(weights[0].device), weights, self.scheme,
                                         st.absmean.to(weights[0].device), self.grid)
            fold_scale(block.get_submodule(prev), [block.get_submodule(c) for c in consumers], s)
            for c in active:
                report.layers.setdefault(f"{prefix}.{c}", {}).update({"awq_ratio": ratio, "awq_rel_err": err})
