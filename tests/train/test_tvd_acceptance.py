"""Why distill=drafter trains with TVD at temperature 1: a drafted token is accepted by rejection
sampling with probability sum_v min(p, q) = 1 - TVD(p, q); the loss equals that, computed directly
and against the empirical acceptance of the rule itself."""

from __future__ import annotations

import pytest
import torch

from train.losses import make_loss

N, V = 16, 11


def test_tvd_is_one_minus_the_acceptance_probability():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    q, p = s.softmax(-1), t.softmax(-1)  # drafter, target
    acceptance = torch.minimum(p, q).sum(-1)  # Leviathan et al. 2023, sec. 3.3 (beta = sum min(p, q))
    tvd = make_loss("tvd", temperature=1.0)(s, t, torch.zeros(N, dtype=torch.long), None)
    assert tvd.item() == pytest.approx((1 - acceptance).sum().item(), rel=1e-12)


def test_tvd_matches_the_empirical_acceptance_of_rejection_sampling():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, V, generator=g, dtype=torch.float64), torch.randn(1, V, generator=g, dtype=torch.float64)
    q, p = s.softmax(-1)[0], t.softmax(-1)[0]
    n = 200_000
    drafted = torch.multinomial(q, n, replacement=True, generator=g)
    accepted = torch.rand(n, generator=g, dtype=torch.float64) < (p[drafted] / q[drafted]).clamp(max=1.0)
    tvd = make_loss("tvd", temperature=1.0)(s, t, torch.zeros(1, dtype=torch.long), None).item()
    # Binomial standard error at n = 2e5 is <= 0.0012: 5 sigma.
    assert accepted.double().mean().item() == pytest.approx(1 - tvd, abs=0.006)


def test_the_drafter_preset_uses_tvd_at_temperature_one(tmp_path):
    from shrink.__main__ import compose
    from train.losses import parse_loss_spec

    cfg = compose(["stage=distill", "distill=drafter", f"run={tmp_path}"])
    terms = parse_loss_spec(cfg.distill.losses, float(cfg.distill.temperature))
    assert [(key, weight) for key, weight, _ in terms] == [("tvd", 1.0)]
    assert terms[0][2].tau == 1.0  # not distill.temperature (2.0): acceptance is at the sampling temperature
