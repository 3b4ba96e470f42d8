"""Pruning methods as the sequential driver runs them: magnitude, Wanda, SparseGPT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shrink.compress.calibration import Report, Stat
from shrink.compress.hessian import Hessian
from shrink.compress.sparsegpt import sparsegpt_prune
from shrink.compress.sparsity import SparsitySpec, magnitude_prune, sparsity
from shrink.compress.wanda import InputNorms, wanda_prune
from common.errors import ShrinkError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneMethod:
    method: str
    spec: SparsitySpec
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ShrinkError(f"prune.method must be one of {', '.join(PRUNE_METHODS)} (got {self.method!r})")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"

    def fits(self, linear: nn.Linear) -> bool:
        return self.spec.fits(linear.in_features)

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Stat | None:
        device = linear.weight.device
        if self.method == "wanda":
            return InputNorms(linear.in_features, device)
        if self.method == "sparsegpt":
            return Hessian(linear.in_features, device)
        return None

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat], report: Report) -> None:
        for name in names:
            linear = block.get_submodule(name)
            w = linear.weight
            if self.method == "magnitude":
                keep = magnitude_prune(w, self.spec)
                new = w.float() * keep
            elif self.method == "wanda":
                keep = wanda_prune(w, stats[name].norms(), self.spec)
                new = w.float() * keep
            else:
                new, keep = sparsegpt_prune(w, stats[name].matrix(), self.spec, damp=self.damp,
                                            block_size=self.block_size)
            w.copy_(new.to(w.dtype))
            full = f"{prefix}.{name}"
            report.masks[full] = keep.cpu()
            report.layers[full] = {"sparsity": sparsity(w)}
