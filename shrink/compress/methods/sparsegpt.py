"""SparseGPT (Frantar & Alistarh 2023): prune with OBS weight reconstruction.

Columns are walked left to right; the mask of each group of M columns (N:M), or of each block
(unstructured: the lowest `ratio` of w^2 / [H^-1]_jj over the block, as the reference), is chosen
by the OBS saliency w_j^2 / [H_F^-1]_jj with the weights as updated so far; each pruned weight's
removal error is spread over the columns to its right through the upper Cholesky factor of H^-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import SettingError
from shrink.compress.hessian import Hessian, inverse_cholesky_upper, prepare
from shrink.compress.methods import register_method
from shrink.compress.methods.base import Pruner
from shrink.compress.sparsity import SparsitySpec, nm_keep_mask


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, spec: SparsitySpec, *, damp: float = 0.01,
                    block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (updated pruned weight [out, in] fp32, keep mask)."""
    w, h = prepare(w, h, damp)
    out, cols = w.shape
    if spec.semi_structured:
        n, m = spec.nm
        block_size = max(m, block_size // m * m)  # an N:M group never straddles a block
    hinv = inverse_cholesky_upper(h)
    keep = torch.ones_like(w, dtype=torch.bool)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag1 = torch.diag(hinv1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if not spec.semi_structured:
            saliency = w1.pow(2) / diag1.pow(2).unsqueeze(0)
            k = int(saliency.numel() * spec.ratio)
            order = torch.sort(saliency.flatten(), stable=True).indices
            keep1.view(-1)[order[:k]] = False
        for i in range(count):
            if spec.semi_structured and i % m == 0:
                saliency = w1[:, i:i + m].pow(2) / diag1[i:i + m].pow(2).unsqueeze(0)
                keep1[:, i:i + m] = nm_keep_mask(saliency, n, m)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w * keep, keep


@register_method("sparsegpt")
@dataclass
class SparseGPT(Pruner):
    damp: float = 0.01       # fraction of mean(diag H) added to the diagonal
    block_size: int = 128    # columns per lazy-update block

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise SettingError("sparsegpt.damp", f"must be >= 0 (got {self.damp})")
        if self.block_size < 1:
            raise SettingError("sparsegpt.block_size", f"must be >= 1 (got {self.block_size})")

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    def keep_mask(self, weight: torch.Tensor, stat: Hessian) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune(weight, stat.matrix(), self.spec, damp=self.damp, block_size=self.block_size)
