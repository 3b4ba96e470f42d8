"""KL divergences between teacher and student next-token distributions.

Both use temperature tau on both sides and are scaled by tau^2 (Hinton et al.), so the gradient
magnitude does not shrink as tau grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import register_loss


@register_loss("forward_kl")
class ForwardKL:
    """KL(teacher || student): mean-seeking, the classic KD loss."""

    uses_teacher = True

    def __init__(self, temperature: float = 1.0, **_: object) -> None:
        self.tau = float(temperature)

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        s = F.log_softmax(student[mask] / self.tau, dim=-1)
        t = F.log_softmax(teacher[mask] / self.tau, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1)
        return kl.sum() * self.tau**2
