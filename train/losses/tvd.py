"""Total variation distance: half the L1 distance between the two distributions (bounded by 1)."""

from __future__ import annotations

import torch

from train.losses import register_loss
from train.losses.kl import TeacherLoss


@register_loss("tvd")
class TotalVariation(TeacherLoss):
    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        s, t = (x.exp() for x in self.log_probs_of(student, teacher, mask))
        # No tau^2 here: TVD is bounded and its gradient does not scale like 1/tau^2.
        return 0.5 * (s - t).abs().sum(-1).sum()
