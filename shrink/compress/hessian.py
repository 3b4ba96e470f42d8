"""The layer-wise Hessian H = 2 X^T X / n of the squared reconstruction error, shared by GPTQ and
SparseGPT, and the damped upper Cholesky factor of its inverse that both algorithms walk."""

from __future__ import annotations

import torch

from common.errors import ShrinkError


class Hessian:
    """Accumulates X^T X over calibration tokens (fp32 sum, normalised on read)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ShrinkError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.tokens)


def prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the columns of inputs that never fire, add `damp` x mean(diag) to the diagonal.
    Returns (w, damped H) as fp32 copies."""
    if damp < 0:
        raise ShrinkError(f"damping must be >= 0 (got {damp})")
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    return w, h


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U). Row i of U, divided by U_ii, is the OBS
    update direction for column i given that columns < i are already fixed; U_ii^2 is
    [H_F^-1]_ii for F = columns >= i."""
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise ShrinkError("the calibration Hessian is not positive definite even after damping; "
                          "raise the damping setting or use more calibration data") from None
