"""Draft steps: greedy rows take the argmax, sampled rows draw from the processed q, and draft +
verify together emit the target's processed distribution."""

from __future__ import annotations

import math

import torch
from token_stats import position_counts, tv, tv_bound

from engine.layers.sampler import SeededRows, sample
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
    """Row 2's proposal depends on its seed and position only: not on the global generator nor on
    the other rows' seeds; a drafter's step j is the proposal at position + j."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))

    def run(global_seed: int, offset: int = 0, position: int = 4) -> int:
        torch.manual_seed(global_seed)
        params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=global_seed),
                  SamplingParams(temperature=1.0, seed=7)]
        seeded = SeededRows.of(params, [global_seed, 0, position], logits.device)
        return int(sample_draft(logits, params, seeded, offset)[0][2])

    assert len({run(s) for s in range(6)}) == 1
    assert run(0, offset=3, position=4) == run(1, offset=0, position=7)


def test_seeded_draft_draws_follow_q_and_are_not_the_target_draws():
    """Many seeds: seeded proposals follow the processed q and never take a token it removed; they
    use their own counters (DRAW_DRAFT), not the plain sampler's token draws at the same positions."""
    rows, v = 20_000, 7
    logits = 1.5 * torch.randn(v, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.9, top_p=0.8, seed=3 * i) for i in range(rows)]
    seeded = SeededRows.of(params, [5] * rows, logits.device)
    tokens, q = sample_draft(logits.expand(rows, -1).clone(), params, seeded)
    want = q[0]
    assert want.eq(0).any()
    counts = torch.bincount(tokens, minlength=v).float()
    assert counts[want == 0].sum() == 0
    assert tv(counts, want) <= tv_bound(rows, v)
    plain = sample(logits.expand(rows, -1).clone(), params, seeded)
    assert (plain != tokens).float().mean() > 0.2  # independent draws from q disagree often


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
