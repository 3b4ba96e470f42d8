"""Comparing sampled tokens with a distribution: total variation and the bound a test allows."""

from __future__ import annotations

import math

import torch


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def tv_bound(n: int, vocab: int, delta: float = 1e-6) -> float:
    """A total-variation threshold that n exact samples from p exceed with probability < delta:
    E[TV] <= 1/2 sum_v sqrt(p_v (1 - p_v) / n) <= 1/2 sqrt((V - 1) / n) (Cauchy-Schwarz), and one
    sample moves TV by at most 1/n, so McDiarmid adds sqrt(ln(1/delta) / (2n)) for the tail."""
    return 0.5 * math.sqrt((vocab - 1) / n) + math.sqrt(math.log(1 / delta) / (2 * n))


def position_counts(out: list[list[int]], j: int, vocab: int) -> torch.Tensor:
    """Counts of the token emitted at position j, over rows that emitted more than j tokens."""
    return torch.bincount(torch.tensor([r[j] for r in out if len(r) > j], dtype=torch.int64), minlength=vocab).float()
