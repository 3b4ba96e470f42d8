"""Cross-entropy on the data's next tokens (the hard-label term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import register_loss


@register_loss("ce")
class CrossEntropy:
    uses_teacher = False

    def __init__(self, **_: object) -> None:
        pass

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        if mask is not None:  # None: every row counts
            student, labels = student[mask], labels[mask]
        return F.cross_entropy(student, labels, reduction="sum")
