"""Medusa heads' training (train/medusa.py): the loss aligned (head i at t against the teacher at t + 1 + i,
equal to a naive reference over full logits, on both loss paths), nothing read past the block, heads trained
on a deterministic sequence agree at their own offset only, the greedy chain, and a short run on a tiny
teacher lowering the validation loss while raising agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.errors import SettingError
from common.medusa import MedusaHeads
from train.config import TrainConfig
from train.loop import make_terms
from train.medusa import (chain_lengths, check_head_config, head_matches, head_rows, heads_loss, train_heads,
                          validate_heads)

TERMS = {"tvd": {"weight": 1.0, "temperature": 1.0}, "forward_kl": {"weight": 0.5, "temperature": 2.0}, "ce": 0.25}


def _random_setup(seed=0, batch=2, seq=11, hidden=12, vocab=37, num_heads=3, num_layers=2):
    g = torch.Generator().manual_seed(seed)
    heads = MedusaHeads(hidden, vocab, num_heads, num_layers)
    with torch.no_grad():
        for p in heads.parameters():  # never zero: an untrained head is the LM head itself
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    features = torch.randn(batch, seq, hidden, generator=g)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    return heads, features, ids, lm_head


def _naive_loss(heads, features, ids, lm_head, tc):
    """Every term over full logits, position by position: head i at t (t + 2 + i in the block) against the
    teacher's distribution at t + 1 + i and the token t + 2 + i; the mean over heads of each head's mean."""
    out, T = heads(features), ids.shape[1]
    totals = []
    for i in range(heads.num_heads):
        rows = []
        for t in range(T - 2 - i):
            s, te, label = lm_head(out[i][:, t]), lm_head(features[:, t + 1 + i]), ids[:, t + 2 + i]
            row = 0.0
            for name, spec in TERMS.items():
                w, tau = (spec, 1.0) if not isinstance(spec, dict) else (spec["weight"], spec["temperature"])
                if name == "ce":
                    v = F.cross_entropy(s, label, reduction="none")
                else:
                    ls, lt = F.log_softmax(s / tau, -1), F.log_softmax(te / tau, -1)
                    v = (0.5 * (ls.exp() - lt.exp()).abs().sum(-1) if name == "tvd"
                         else (lt.exp() * (lt - ls)).sum(-1) * tau**2)
                row = row + w * v
            rows.append(row)
        totals.append(torch.stack(rows).mean())
    return torch.stack(totals).mean()


@pytest.mark.parametrize("fused", [True, False])
def test_loss_equals_the_naive_aligned_reference(fused):
    heads, features, ids, lm_head = _random_setup()
    tc = TrainConfig(losses=TERMS, temperature=2.0)
    loss, parts = heads_loss(heads, features, ids, lm_head, make_terms(tc), chunk_size=5, fused=fused)
    reference = _naive_loss(heads, features, ids, lm_head, tc)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert set(parts) == {f"head{i}_{t}" for i in range(3) for t in TERMS}
    # The gradients of the heads agree too (the fused path takes them in forward).
    grads = torch.autograd.grad(loss, list(heads.parameters()))
    ref_grads = torch.autograd.grad(reference, list(heads.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_head_rows_alignment():
    ids = torch.arange(10).view(1, 10)
    features = torch.arange(10.0).view(1, 10, 1)
    for i in range(4):
        s, t, labels = head_rows(features, features * 100, ids, i)
        n = 10 - 2 - i  # rows t = 0 .. T - 3 - i
        assert s.shape[1] == t.shape[1] == labels.shape[1] == n
        assert s[0, :, 0].tolist() == [100.0 * p for p in range(n)]       # the head reads f_t
        assert t[0, :, 0].tolist() == [float(p + 1 + i) for p in range(n)]  # the teacher at t + 1 + i
        assert labels[0].tolist() == [p + 2 + i for p in range(n)]          # token t + 2 + i
        assert labels[0, -1].item() == 9                                    # the block's last token, no further


def test_nothing_past_the_block_counts():
    """The teacher's last position predicts a token outside the block: no head's loss reads it; the one before
    it is every head's last target, and changing it changes every head's loss."""
    heads, features, ids, lm_head = _random_setup(seq=9)
    terms = make_terms(TrainConfig(losses=TERMS))
    with torch.no_grad():
        _, base = heads_loss(heads, features, ids, lm_head, terms, 4, fused=False)
        last = features.clone()
        last[:, -1] += 5.0
        _, same = heads_loss(heads, last, ids, lm_head, terms, 4, fused=False)
        before_last = features.clone()
        before_last[:, -2] += 5.0
        _, changed = heads_loss(heads, before_last, ids, lm_head, terms, 4, fused=False)
    assert all(torch.equal(base[k], same[k]) for k in base)
    for i in range(heads.num_heads):
        assert not torch.equal(base[f"head{i}_tvd"], changed[f"head{i}_tvd"]), i


def test_block_too_short_for_the_heads_is_named():
    tc = TrainConfig()
    check_head_config(tc, 4, 6)
    with pytest.raises(SettingError, match=r"medusa.num_heads=4 needs data.block_size >= num_heads \+ 2 = 6 \(head i predicts token t \+ 2 \+ i\), got 5"):
        check_head_config(tc, 4, 5)
    with pytest.raises(SettingError, match="lmbda does not apply to Medusa heads"):
        check_head_config(TrainConfig(lmbda=0.5), 2, 64)


def _cycle_setup(vocab=16, seq=24, batch=6, seed=0):
    """A deterministic sequence x_{p+1} = pi(x_p) (pi one cycle over the vocabulary) and a teacher that knows
    it: f_p is the one-hot of x_{p+1} and the LM head the identity (scaled), so the teacher's argmax at p is
    token p + 1."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab, generator=g)
    nxt = torch.empty(vocab, dtype=torch.long)
    nxt[order] = order.roll(-1)
    starts = torch.randint(0, vocab, (batch,), generator=g)
    ids = [starts]
    for _ in range(seq - 1):
        ids.append(nxt[ids[-1]])
    ids = torch.stack(ids, 1)
    features = F.one_hot(nxt[ids], vocab).float()
    lm_head = torch.nn.Linear(vocab, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.eye(vocab) * 8.0)
    return ids, features, lm_head


@pytest.mark.parametrize("loss", ["tvd", "forward_kl", "ce"])
def test_heads_learn_a_deterministic_sequence_at_their_own_offset_only(loss):
    ids, features, lm_head = _cycle_setup()
    vocab, num_heads = lm_head.weight.shape[0], 3
    heads = MedusaHeads(vocab, vocab, num_heads)
    terms = make_terms(TrainConfig(losses={loss: 1.0}, temperature=1.0))
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(150):
        loss_value, _ = heads_loss(heads, features, ids, lm_head, terms, chunk_size=32)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    T = ids.shape[1]
    with torch.no_grad():
        out = heads(features)
        for i in range(num_heads):
            n = T - 2 - i
            pred = lm_head(out[i][:, :n]).argmax(-1)
            assert (pred == ids[:, 2 + i: 2 + i + n]).float().mean().item() == 1.0, i  # token t + 2 + i
            for wrong in (1 + i, 3 + i):  # one short, one too far: the cycle (16 long) never repeats them
                width = min(n, T - wrong)
                assert (pred[:, :width] == ids[:, wrong: wrong + width]).float().mean().item() == 0.0, (i, wrong)
        matches = head_matches(heads, features, lm_head, chunk_size=7)
    assert matches.shape == (num_heads, ids.shape[0], T - 1 - num_heads) and bool(matches.all())
    assert chain_lengths(matches.flatten(1)).float().mean(1).tolist() == [1.0, 2.0, 3.0]


def test_untrained_heads_predict_the_next_token_and_miss_on_the_cycle():
    """Zero-initialised heads are the LM head: they predict token t + 1, which is never token t + 2 + i here."""
    ids, features, lm_head = _cycle_setup()
    heads = MedusaHeads(16, 16, 2)
    with torch.no_grad():
        assert not head_matches(heads, features, lm_head, chunk_size=8).any()


def test_chain_lengths_count_the_leading_run():
    matches = torch.tensor([[1, 1, 0, 1, 0],
                            [1, 0, 1, 1, 0],
                            [1, 1, 1, 0, 1]], dtype=torch.bool)
    assert chain_lengths(matches).tolist() == [[1, 1, 0, 1, 0],
                                               [2, 1, 0, 2, 0],
                                               [3, 1, 0, 2, 0]]


def test_short_training_lowers_the_validation_loss_and_raises_agreement(tmp_path):
    """A tiny random teacher (its final norm scaled up, so its distributions are peaked) reading a
    deterministic cycle over 20 tokens: the heads' validation TVD falls and their agreement with the
    teacher's argmax (and the greedy chain) rises from ~0; metrics and the step log are recorded."""
    from support import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(10.0)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(20, generator=g) + 3
    nxt = torch.zeros(320, dtype=torch.long)
    nxt[order] = order.roll(-1)
    ids = [order[torch.randint(0, 20, (40,), generator=g)]]
    for _ in range(31):
        ids.append(nxt[ids[-1]])
    blocks = torch.stack(ids, 1)
    train, val = blocks[:32], blocks[32:]
    heads = MedusaHeads(teacher.config.hidden_size, teacher.config.vocab_size, 3)
    tc = TrainConfig(max_steps=60, batch_size=8, lr=3e-2, warmup_steps=2, chunk_size=64, val_batches=1,
                     losses={"tvd": {"weight": 1.0, "temperature": 1.0}})
    m = train_heads(heads, teacher, train, val, tc, torch.device("cpu"), tmp_path / "log.jsonl")
    assert m["val_loss"] < 0.6 * m["init_val_loss"], (m["val_loss"], m["init_val_loss"])
    assert max(m["init_head_agreement"]) < 0.05 and min(m["head_agreement"]) > 0.4, m
    assert m["mean_accepted_length"][3] > 1.5 > m["init_mean_accepted_length"][3]
    assert list(m["mean_accepted_length"]) == [1, 2, 3] and m["val_positions"] == 8 * (32 - 4)
    assert m["train_tokens"] == 60 * 8 * 32
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 60
    again = validate_heads(heads, teacher, val, make_terms(tc), tc, torch.device("cpu"))
    assert again["head_agreement"] == m["head_agreement"]
