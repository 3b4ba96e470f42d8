"""The chunked loss equals the loss on whole-batch logits, in value and gradient; top-k truncation."""

from __future__ import annotations

import pytest
import torch

from train.chunked_loss import LossTerm, chunked_distill_loss
from train.losses import make_loss


def _setup(seed: int = 0, hidden: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    s_head, t_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden + 4, vocab, bias=False)
    s_hidden = torch.randn(3, 11, hidden, generator=g, requires_grad=True)
    t_hidden = torch.randn(3, 11, hidden + 4, generator=g)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[0, :4] = -100
    terms = [LossTerm("forward_kl", 1.0, make_loss("forward_kl", temperature=2.0)),
             LossTerm("jsd", 0.5, make_loss("jsd", temperature=1.0, beta=0.3)),
             LossTerm("tvd", 0.25, make_loss("tvd")),
             LossTerm("ce", 0.7, make_loss("ce"))]
    return s_head, t_head, s_hidden, t_hidden, labels, terms


def _unchunked(s_head, t_head, s_hidden, t_hidden, labels, terms):
    s = s_head(s_hidden).reshape(-1, s_head.out_features)
    t = t_head(t_hidden).reshape(-1, t_head.out_features).detach()
    lab = labels.reshape(-1)
    mask = lab != -100
    n = mask.sum()
    return sum(term.weight * term.fn(s, t, lab.clamp_min(0), mask) / n for term in terms)


@pytest.mark.parametrize("chunk", [1, 5, 7, 33, 1000])
def test_chunked_equals_unchunked(chunk):
    s_head, t_head, s_hidden, t_hidden, labels, terms = _setup()
    ref = _unchunked(s_head, t_head, s_hidden, t_hidden, labels, terms)
    ref_grads = torch.autograd.grad(ref, [s_hidden, s_head.weight])
    got, parts = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, chunk)
    got_grads = torch.autograd.grad(got, [s_hidden, s_head.weight])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert set(parts) == {"forward_kl", "jsd", "tvd", "ce"}
    assert t_head.weight.grad is None  # the teacher never gets gradients


def test_top_k_restricts_both_distributions_to_the_teachers_top_tokens():
    s_head, t_head, s_hidden, t_hidden, labels, _ = _setup(seed=1)
    terms = [LossTerm("reverse_kl", 1.0, make_loss("reverse_kl"))]
    got, _ = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, 8, top_k=5)
    s = s_head(s_hidden).reshape(-1, 50)
    t = t_head(t_hidden).reshape(-1, 50)
    lab = labels.reshape(-1)
    mask = lab != -100
    tv, idx = t.topk(5, -1)
    ref = make_loss("reverse_kl")(s.gather(-1, idx), tv, lab, mask) / mask.sum()
    torch.testing.assert_close(got, ref)
    assert torch.isfinite(got)
    full, _ = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, 8)
    assert not torch.isclose(got, full)


def test_all_masked_gives_zero_with_a_graph():
    s_head, t_head, s_hidden, t_hidden, labels, terms = _setup()
    loss, parts = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, torch.full_like(labels, -100), terms, 4)
    assert loss.item() == 0.0 and loss.requires_grad and all(v == 0.0 for v in parts.values())
