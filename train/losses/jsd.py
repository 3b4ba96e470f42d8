"""Generalized Jensen-Shannon divergence JSD(beta), as in GKD (Agarwal et al. 2024).

Convention (ours, stated because TRL's differed in its early releases): with the mixture
M = beta * P_teacher + (1 - beta) * P_student,

    JSD(beta) = [beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)] / (beta * (1 - beta))

rescaled so that its limits are the two KLs:
    beta -> 0  gives KL(teacher || student)  (forward KL),
    beta -> 1  gives KL(student || teacher)  (reverse KL),
and beta = 0.5 is 4x the symmetric JSD. At the exact ends (0 and 1) we return the limits.
(The unscaled GKD form, beta*KL(P||M) + (1-beta)*KL(Q||M), tends to 0 at both ends; TRL's
`generalized_jsd_loss` also returns the KLs at the ends, but early versions swapped which end was
which. Here beta is the TEACHER's weight in the mixture.)
"""

from __future__ import annotations

import math

import torch

from common.errors import SettingError
from train.losses import register_loss
from train.losses.kl import TeacherLoss, kl


def generalized_jsd(s_log: torch.Tensor, t_log: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row JSD(beta) from log-probs (see the module docstring for the convention)."""
    if beta <= 0.0:
        return kl(t_log, s_log)
    if beta >= 1.0:
        return kl(s_log, t_log)
    m_log = torch.logsumexp(torch.stack([t_log + math.log(beta), s_log + math.log(1 - beta)]), dim=0)
    mix = beta * kl(t_log, m_log) + (1 - beta) * kl(s_log, m_log)
    return mix / (beta * (1 - beta))


@register_loss("jsd")
class GeneralizedJSD(TeacherLoss):
    def __init__(self, temperature: float = 1.0, beta: float = 0.5, **_: object) -> None:
        super().__init__(temperature)
        self.beta = float(beta)
        if not 0.0 <= self.beta <= 1.0:
            raise SettingError("beta", f"must be in [0, 1], got {beta}", sep=" ")

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        s, t = self.log_probs_of(student, teacher, mask)
        return generalized_jsd(s, t, self.beta).sum() * self.tau**2
