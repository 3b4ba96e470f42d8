"""GPTQ (Frantar et al. 2022): quantize columns one by one and spread each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian (OBS), in blocks with
lazy batched updates.

act_order processes columns by decreasing Hessian diagonal (most salient first). With groups, the
group scales are then fixed up front from the weights (llm-compressor's "weight" act-order), so
groups stay contiguous in the saved file and no g_idx is needed. Without act_order, group scales
are computed when the walk reaches each group, from the already-updated weights (as the paper).

`keep` (a sparsity mask) composes with pruning: pruned weights are quantized to exactly zero, and
their error, like any rounding error, is compensated by the later columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import SettingError
from shrink.compress.hessian import Hessian, inverse_cholesky_upper, prepare
from shrink.compress.methods import register_method
from shrink.compress.methods.base import WeightQuantizer
from shrink.compress.quant import QuantizedWeight, QuantSpec, compute_qparams, quantize, quantize_column


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128,
                  keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize weight [out, in] given the Hessian [in, in] of its inputs."""
    w, h = prepare(w, h, damp)
    out, cols = w.shape
    gs = spec.group_size or cols
    if spec.group_size is not None:
        block_size = max(gs, block_size // gs * gs)  # a group never straddles a block
    static = spec.group_size is None or act_order
    scale = torch.empty(out, spec.groups(cols), device=w.device)
    zero = torch.empty_like(scale)
    if static:
        scale[:], zero[:] = compute_qparams(w, spec)

    perm = torch.arange(cols, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        if keep is not None:
            keep = keep[:, perm]
    group_of = perm // gs if spec.group_size is not None else torch.zeros_like(perm)
    hinv = inverse_cholesky_upper(h)

    qw = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                # Scales for this group from the weights as GPTQ has updated them so far.
                g = col // gs
                s, z = compute_qparams(w1[:, i:i + gs], QuantSpec(spec.bits, None, spec.symmetric))
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            g = int(group_of[col])
            q = quantize_column(w1[:, i], scale[:, g], zero[:, g], spec)
            if keep is not None:
                q = torch.where(keep[:, col], q, torch.zeros_like(q))
            qw[:, col] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if act_order:
        qw = qw[:, torch.argsort(perm)]
    return QuantizedWeight(quantize(qw, scale, zero, spec), scale, zero, spec)


@register_method("gptq")
@dataclass
class GPTQ(WeightQuantizer):
    damp: float = 0.01       # fraction of mean(diag H) added to the diagonal
    act_order: bool = True   # columns by decreasing Hessian diagonal (group scales fixed up front)
    block_size: int = 128    # columns per lazy-update block

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise SettingError("gptq.damp", f"must be >= 0 (got {self.damp})")
        if self.block_size < 1:
            raise SettingError("gptq.block_size", f"must be >= 1 (got {self.block_size})")

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    def quantize_weight(self, weight: torch.Tensor, stat: Hessian, keep: torch.Tensor | None) -> QuantizedWeight:
        return gptq_quantize(weight, stat.matrix(), self.scheme, damp=self.damp, act_order=self.act_order,
                             block_size=self.block_size, keep=keep)
