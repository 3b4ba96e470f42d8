"""KL divergences between teacher and student next-token distributions.

Both use temperature tau on both sides and are scaled by tau^2 (Hinton et al.), so the gradient
magnitude does not shrink as tau grows. Teacher log-probs may be -inf (top-k truncation): a token
the teacher gives zero mass contributes 0 to KL(teacher || student).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import register_loss


def log_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(logits / tau, dim=-1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probs; rows of p with zero mass on a token ignore it."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


class TeacherLoss:
    """Base of the losses that compare the two distributions at temperature tau."""

    uses_teacher = True

    def __init__(self, temperature: float = 1.0, **_: object) -> None:
        self.tau = float(temperature)

    def log_probs_of(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
        """(student, teacher) log-probs of the masked rows (all rows if mask is None), at temperature tau."""
        if mask is not None:
            student, teacher = student[mask], teacher[mask]
        return log_probs(student, self.tau), log_probs(teacher, self.tau)


@register_loss("forward_kl")
class ForwardKL(TeacherLoss):
    """KL(teacher || student): mean-seeking, the classic KD loss."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        s, t = self.log_probs_of(student, teacher, mask)
        return kl(t, s).sum() * self.tau**2


@register_loss("reverse_kl")
class ReverseKL(TeacherLoss):
    """KL(student || teacher): mode-seeking; the student may drop teacher modes it cannot fit."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        s, t = self.log_probs_of(student, teacher, mask)
        return kl(s, t).sum() * self.tau**2
