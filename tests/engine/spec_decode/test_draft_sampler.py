"""Draft steps: greedy rows take the argmax, sampled rows draw from the processed q, and draft +
verify together emit the target's processed distribution."""

from __future__ import annotations

import math

import torch
from token_stats import position_counts, tv, tv_bound

from engine.sampling_params import SamplingParams
from engine.spec_decode.draft_sampler import sample_draft
from engine.spec_decode.rejection import processed_probs, verify


def test_all_greedy_returns_the_argmax_and_no_probs():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    tokens, q = sample_draft(logits, [SamplingParams(temperature=0)] * 5)
    assert torch.equal(tokens, logits.argmax(-1)) and q is None


def test_sampled_rows_follow_q_and_greedy_rows_stay_argmax():
    rows, v = 20_000, 7
    logits = 1.5 * torch.randn(v, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0) if i % 4 == 0 else SamplingParams(temperature=0.9, top_p=0.8)
              for i in range(rows)]
    torch.manual_seed(2)
    tokens, q = sample_draft(logits.expand(rows, -1).clone(), params)
    greedy = torch.tensor([p.greedy for p in params])
    assert tokens[greedy].eq(logits.argmax()).all()
    sampled = tokens[~greedy]
    want = processed_probs(logits[None, None], [params[1]])[0, 0]
    assert torch.allclose(q[1], want)
    assert want.eq(0).any()  # top_p removed some tokens ...
    counts = torch.bincount(sampled, minlength=v).float()
    assert counts[want == 0].sum() == 0  # ... and none of them is drawn
    assert tv(counts, want) <= tv_bound(len(sampled), v)


def test_seeded_row_is_reproducible():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, seed=7)] * 3

    def run(global_seed: int) -> int:
        torch.manual_seed(global_seed)
        gens = [None, torch.Generator().manual_seed(global_seed), torch.Generator().manual_seed(7)]
        return int(sample_draft(logits, params, gens)[0][2])

    assert len({run(s) for s in range(6)}) == 1


def test_draft_then_verify_emits_the_targets_processed_distribution():
    """The pieces as the engine will chain them: k draft steps from a poor draft model (the target's
    logits plus noise as large as them), each sampled with sample_draft, then verify()."""
    rows, k, v = 30_000, 2, 6
    g = torch.Generator().manual_seed(4)
    target_logits = 2.0 * torch.randn(k + 1, v, generator=g)
    draft_logits = target_logits[:k] + 2.0 * torch.randn(k, v, generator=g)
    params = [SamplingParams(temperature=0.8, min_p=0.05)] * rows
    torch.manual_seed(5)
    steps = [sample_draft(draft_logits[j].expand(rows, -1).clone(), params) for j in range(k)]
    draft = torch.stack([t for t, _ in steps], dim=1)
    q = torch.stack([p for _, p in steps], dim=1)
    res = verify(draft, torch.full((rows,), k), target_logits.expand(rows, -1, -1), params, q)
    out = res.to_lists()
    want = processed_probs(target_logits[None], params[:1])[0]
    # Acceptance of the first proposal: sum_x min(p_0, q_0), the rate that needs q (treating the draft
    # as one-hot would also be lossless, but accepts only sum_x q_0 p_0).
    overlap = torch.minimum(want[0], q[0, 0]).sum().item()
    rate = res.num_accepted.gt(0).float().mean().item()
    assert abs(rate - overlap) < 5 * math.sqrt(overlap * (1 - overlap) / rows)
    for j in range(k + 1):
        counts = position_counts(out, j, v)
        assert counts.sum() >= 200, (j, counts.sum())
        assert tv(counts, want[j]) <= tv_bound(int(counts.sum()), v), j
