"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

No weight update. The statistic is the L2 norm of each input feature over all calibration tokens,
accumulated as a running sum of squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shrink.compress.methods import register_method
from shrink.compress.methods.base import Pruner
from shrink.compress.sparsity import SparsitySpec, keep_mask


class InputNorms:
    """Running sum of squares of each input feature over calibration tokens."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += x.pow(2).sum(dim=0).double()
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt().float()


def wanda_score(w: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    return w.abs().float() * col_norms.to(w.device).float().unsqueeze(0)


def wanda_prune(w: torch.Tensor, col_norms: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep mask for weight [out, in] given the input feature norms [in]."""
    return keep_mask(wanda_score(w, col_norms), spec)


@register_method("wanda")
@dataclass
class Wanda(Pruner):
    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)

    def keep_mask(self, weight: torch.Tensor, stat: InputNorms) -> tuple[torch.Tensor, torch.Tensor]:
        keep = wanda_prune(weight, stat.norms(), self.spec)
        return weight.float() * keep, keep
