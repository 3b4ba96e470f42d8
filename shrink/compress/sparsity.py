"""Sparsity masks from importance scores: N:M semi-structured and unstructured per row.

Ties are broken by position so results are deterministic: among equal scores the one with the
lower input index is pruned first (a stable ascending sort). This matters on weights that were
dequantized from a 4-bit grid, where about 15% of 2:4 groups hold ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import SettingError, ShrinkError


@dataclass(frozen=True)
class SparsitySpec:
    """`structure` is "2:4"-style N:M (N zeros in every M along the input dimension) or
    "unstructured" with `ratio` the fraction of each row set to zero."""

    structure: str = "2:4"
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.structure != "unstructured":
            self.nm  # validates
        elif not 0.0 < self.ratio < 1.0:
            raise SettingError("ratio", f"must be in (0, 1) for unstructured sparsity (got {self.ratio})")

    @property
    def nm(self) -> tuple[int, int]:
        try:
            n, m = (int(v) for v in self.structure.split(":"))
        except ValueError:
            raise SettingError("structure", f"must be 'N:M' (e.g. 2:4) or 'unstructured' (got {self.structure!r})") from None
        if not 0 < n < m:
            raise SettingError("structure", f"{self.structure}: need 0 < N < M")
        return n, m

    @property
    def semi_structured(self) -> bool:
        return self.structure != "unstructured"

    @property
    def target_sparsity(self) -> float:
        if self.semi_structured:
            n, m = self.nm
            return n / m
        return self.ratio

    def fits(self, in_features: int) -> bool:
        return not self.semi_structured or in_features % self.nm[1] == 0


def nm_keep_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep mask [out, in]: in every group of m consecutive inputs the n lowest scores are pruned."""
    out, inp = score.shape
    if inp % m:
        raise ShrinkError(f"in_features {inp} is not divisible by {m} for {n}:{m} sparsity")
    groups = score.reshape(out, inp // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], False)
    return keep.reshape(out, inp)


def row_keep_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep mask pruning the `ratio` lowest-scored entries of every row."""
    k = int(score.shape[1] * ratio)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        order = torch.sort(score, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :k], False)
    return keep


def keep_mask(score: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    if spec.semi_structured:
        return nm_keep_mask(score, *spec.nm)
    return row_keep_mask(score, spec.ratio)


def magnitude_prune(w: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep mask by |w| alone (the baseline)."""
    return keep_mask(w.abs().float(), spec)


def is_nm_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive inputs of every row holds at least n zeros."""
    out, inp = w.shape
    if inp % m:
        return False
    zeros = (w.reshape(out, inp // m, m) == 0).sum(dim=-1)
    return bool((zeros >= n).all())


def sparsity(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())
