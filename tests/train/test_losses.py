"""Every logit loss against a direct reference on random logits, its gradient, and JSD's ends."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import ShrinkError, config_section
from train.losses import loss_names, make_loss, parse_loss_spec

N, V = 12, 37


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    mask[0] = True
    return s, t, labels, mask


def _softmax(x: torch.Tensor, tau: float) -> list[list[float]]:
    """Row-wise softmax in plain Python floats: a reference that shares no code with the losses."""
    rows = []
    for row in (x.detach() / tau).tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        z = sum(e)
        rows.append([v / z for v in e])
    return rows


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_forward_kl(s, t, labels, mask, tau):
    P, Q = _softmax(t, tau), _softmax(s, tau)
    return sum(_kl(P[i], Q[i]) for i in range(N) if mask[i]) * tau**2


def ref_reverse_kl(s, t, labels, mask, tau):
    P, Q = _softmax(t, tau), _softmax(s, tau)
    return sum(_kl(Q[i], P[i]) for i in range(N) if mask[i]) * tau**2


def ref_jsd(s, t, labels, mask, tau, beta):
    P, Q = _softmax(t, tau), _softmax(s, tau)
    total = 0.0
    for i in range(N):
        if mask[i]:
            M = [beta * a + (1 - beta) * b for a, b in zip(P[i], Q[i])]
            total += (beta * _kl(P[i], M) + (1 - beta) * _kl(Q[i], M)) / (beta * (1 - beta))
    return total * tau**2


def ref_tvd(s, t, labels, mask, tau):
    P, Q = _softmax(t, tau), _softmax(s, tau)
    return sum(0.5 * sum(abs(a - b) for a, b in zip(P[i], Q[i])) for i in range(N) if mask[i])


def ref_ce(s, t, labels, mask, tau):
    Q = _softmax(s, 1.0)
    return sum(-math.log(Q[i][int(labels[i])]) for i in range(N) if mask[i])


CASES = [
    ("forward_kl", {}, ref_forward_kl),
    ("reverse_kl", {}, ref_reverse_kl),
    ("jsd", {"beta": 0.5}, lambda *a: ref_jsd(*a, beta=0.5)),
    ("jsd", {"beta": 0.2}, lambda *a: ref_jsd(*a, beta=0.2)),
    ("tvd", {}, ref_tvd),
    ("ce", {}, ref_ce),
]


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("name,kwargs,ref", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_loss_matches_reference(name, kwargs, ref, tau):
    s, t, labels, mask = _logits(seed=3)
    loss = make_loss(name, temperature=tau, **kwargs)
    got = loss(s, t, labels, mask)
    assert got.item() == pytest.approx(ref(s, t, labels, mask, tau), rel=1e-9, abs=1e-9)


def _numeric_grad(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    g = torch.zeros_like(x)
    flat = x.detach().clone().view(-1)
    for k in range(flat.numel()):
        old = flat[k].item()
        flat[k] = old + eps
        up = fn(flat.view_as(x))
        flat[k] = old - eps
        down = fn(flat.view_as(x))
        flat[k] = old
        g.view(-1)[k] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("name,kwargs,ref", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_loss_gradient_matches_finite_differences_of_reference(name, kwargs, ref):
    s, t, labels, mask = _logits(seed=5)
    tau = 1.7
    loss = make_loss(name, temperature=tau, **kwargs)
    loss(s, t, labels, mask).backward()
    # Finite differences of the pure-Python reference on a few rows (all rows is slow in Python).
    rows = [0, 1]
    for i in rows:
        def f(row, i=i):
            s2 = s.detach().clone()
            s2[i] = row
            return ref(s2, t, labels, mask, tau)
        num = _numeric_grad(f, s.detach()[i].clone())
        torch.testing.assert_close(s.grad[i], num, rtol=1e-5, atol=1e-7)


def test_jsd_ends_are_the_kls():
    s, t, labels, mask = _logits(seed=7)
    fkl = make_loss("forward_kl", temperature=1.3)(s, t, labels, mask)
    rkl = make_loss("reverse_kl", temperature=1.3)(s, t, labels, mask)
    assert not torch.isclose(fkl, rkl), "pick logits where the two KLs differ"
    # Exactly at the ends, and continuously near them.
    torch.testing.assert_close(make_loss("jsd", temperature=1.3, beta=0.0)(s, t, labels, mask), fkl)
    torch.testing.assert_close(make_loss("jsd", temperature=1.3, beta=1.0)(s, t, labels, mask), rkl)
    near0 = make_loss("jsd", temperature=1.3, beta=1e-6)(s, t, labels, mask)
    near1 = make_loss("jsd", temperature=1.3, beta=1 - 1e-6)(s, t, labels, mask)
    torch.testing.assert_close(near0, fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(near1, rkl, rtol=1e-4, atol=1e-6)


def test_losses_are_zero_when_student_equals_teacher_and_positive_otherwise():
    s, t, labels, mask = _logits(seed=9)
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        fn = make_loss(name, temperature=2.0)
        assert fn(t.clone(), t, labels, mask).item() == pytest.approx(0.0, abs=1e-10)
        assert fn(s, t, labels, mask).item() > 1e-3


def test_registry_and_spec_parsing():
    assert {"ce", "forward_kl", "reverse_kl", "jsd", "tvd"} <= set(loss_names())
    terms = parse_loss_spec({"forward_kl": 1.0, "ce": 0.0, "sharp": {"loss": "jsd", "beta": 0.9, "weight": 0.3,
                                                                       "temperature": 1.0}}, temperature=2.0)
    assert [(k, w) for k, w, _ in terms] == [("forward_kl", 1.0), ("sharp", 0.3)]
    assert terms[0][2].tau == 2.0 and terms[1][2].tau == 1.0 and terms[1][2].beta == 0.9
    with pytest.raises(ShrinkError, match="gqa.train.losses"), config_section("gqa.train"):
        parse_loss_spec({"nope": 1.0}, 1.0)
    with pytest.raises(ShrinkError, match="beta"):
        parse_loss_spec({"jsd": {"beta": 1.5}}, 1.0)
    with pytest.raises(ShrinkError, match="distill.losses"), config_section("distill"):
        parse_loss_spec({}, 1.0)
