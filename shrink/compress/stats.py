"""Per-channel activation statistics (AWQ, SmoothQuant), gathered by forward hooks during calibration."""

from __future__ import annotations

import torch


class ActStats:
    """Per-channel max |x| and mean |x| over all tokens, plus an evenly strided subsample of tokens
    (at most `max_tokens`) for losses that need real inputs (AWQ's scale search)."""

    def __init__(self, in_features: int, device: torch.device, total_tokens: int = 0, max_tokens: int = 0) -> None:
        self.absmax = torch.zeros(in_features, device=device)
        self.abssum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.stride = max(1, -(-total_tokens // max_tokens)) if max_tokens else 0
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.abssum += x.abs().sum(dim=0).double()
        self.tokens += x.shape[0]
        if self.stride:
            self.samples.append(x[:: self.stride].clone())

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, self.absmax.numel())
