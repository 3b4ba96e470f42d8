"""Rejection sampling: greedy identity, the output distribution equals the target's, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from token_stats import position_counts, tv, tv_bound

from engine.layers.sampler import SeededRows
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.proposer import Proposal, draft_limit
from engine.spec_decode.rejection import (
    PLACEHOLDER, _accepted_prefix, greedy_verify, processed_probs, rejection_sample, verify,
)


# -- greedy -----------------------------------------------------------------------------------------
def test_greedy_verify_accepts_the_matching_prefix_then_the_argmax():
    g = torch.Generator().manual_seed(0)
    b, k, v = 64, 5, 11
    argmax = torch.randint(0, v, (b, k + 1), generator=g)
    # Drafts agree with the argmax up to a random point, then disagree.
    agree = torch.randint(0, k + 1, (b,), generator=g)
    draft = argmax[:, :k].clone()
    for i in range(b):
        if agree[i] < k:
            draft[i, agree[i]] = (argmax[i, agree[i]] + 1) % v
    num_draft = torch.randint(0, k + 1, (b,), generator=g)
    out = greedy_verify(draft, num_draft, argmax)
    lists = out.to_lists()
    for i in range(b):
        a = min(int(agree[i]), int(num_draft[i]))
        assert out.num_accepted[i] == a
        assert lists[i] == argmax[i, : a + 1].tolist()  # exactly what plain greedy decoding emits
        assert out.token_ids[i, a + 1 :].eq(PLACEHOLDER).all()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _model_drafter(draft, error_rate: float = 0.0):
    """Greedy proposals of ``draft``; with error_rate > 0 each proposal is replaced by a wrong
    token with that probability (seeded), and the draft goes on from the wrong one."""
    g = torch.Generator().manual_seed(0)

    def propose(seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        out = []
        for seq, n in zip(seqs, ks):
            d: list[int] = []
            for _ in range(n):
                token = int(_logits(draft, seq.token_ids + d)[-1].argmax())
                if torch.rand(1, generator=g).item() < error_rate:
                    token = (token + 1) % 256
                d.append(token)
            out.append(d)
        return out

    return propose


@pytest.mark.parametrize("drafter", ["draft_model", "ngram", "flawed_target"])
def test_speculative_greedy_equals_plain_greedy_in_a_ragged_batch(drafter, model_dir, hf_reference):
    """The verify rule on real (tiny, random) models, with the engine's per-sequence draft limit:
    a draft model of another architecture that mostly disagrees, or the n-gram proposer on prompts
    that repeat themselves, or the target itself with 30% of its proposals made wrong (so runs are
    accepted, cut, and completed by bonus tokens); k differs per row and some rows propose nothing
    at some steps. The tokens are still those of transformers' greedy decoding."""
    from transformers import AutoModelForCausalLM

    from tiny_models import prompts

    target_name, new_tokens = "llama_gqa_untied", 16
    target = AutoModelForCausalLM.from_pretrained(model_dir(target_name), dtype=torch.float32).eval()
    batch = prompts(5, seed=3, lo=2, hi=20)
    if drafter == "ngram":
        batch = [p + p for p in batch]
        ngram = NgramProposer(1, 3)
        propose = lambda seqs, ks: ngram.propose(seqs, ks).token_ids  # noqa: E731
    elif drafter == "draft_model":
        draft = AutoModelForCausalLM.from_pretrained(model_dir("qwen2_bias"), dtype=torch.float32).eval()
        propose = _model_drafter(draft)
    else:
        propose = _model_drafter(target, error_rate=0.3)
    want = hf_reference(target_name, batch, new_tokens)
    seqs = [Sequence(p, SamplingParams(temperature=0, max_tokens=new_tokens)) for p in batch]
    row_k = [0, 1, 2, 4, 3]  # row 0 never drafts
    proposed = accepted = 0
    while any(s.num_output_tokens < new_tokens for s in seqs):
        live = [s for s in seqs if s.num_output_tokens < new_tokens]
        ks = [draft_limit(s, row_k[seqs.index(s)], max_model_len=512) for s in live]
        drafts = propose(live, ks)
        k = max(len(d) for d in drafts)
        logits = []
        for seq, d in zip(live, drafts):
            full = _logits(target, seq.token_ids + d)[seq.num_tokens - 1 :]  # positions len-1 .. len-1+n
            logits.append(torch.cat([full, full.new_zeros(k - len(d), full.shape[1])]))
        ids, counts = Proposal(drafts).as_tensors("cpu", k)
        res = verify(ids, counts, torch.stack(logits), [s.params for s in live])
        for seq, toks in zip(live, res.to_lists()):
            seq.token_ids.extend(toks)
        proposed += int(counts.sum())
        accepted += int(res.num_accepted.sum())
    assert [s.output_token_ids for s in seqs] == want
    assert 0 < proposed and accepted < proposed  # the drafter proposed, and was wrong at times
    if drafter == "flawed_target":
        assert accepted > proposed // 3  # long accepted runs and bonus tokens were exercised


# -- distribution (after vLLM's test_rejection_sampling_approximates_target_distribution) --------------
VOCAB, K, ROWS = 6, 3, 40_000


def _poor_setup(seed: int = 0):
    """Per-position target p_j and a draft q_j that favours the tokens p dislikes; ragged draft
    lengths; draft tokens sampled from q."""
    g = torch.Generator().manual_seed(seed)
    target_logits = 1.5 * torch.randn(K + 1, VOCAB, generator=g)
    p = target_logits.softmax(-1)
    q = (-target_logits[:K] + 0.3 * torch.randn(K, VOCAB, generator=g)).softmax(-1)
    draft = torch.stack([torch.multinomial(q[j], ROWS, replacement=True, generator=g) for j in range(K)], dim=1)
    num_draft = torch.randint(0, K + 1, (ROWS,), generator=g)
    num_draft[: ROWS // 2] = K  # half the rows propose all k: enough samples at the bonus position
    return p, q, draft, num_draft


def _accept_always(draft, num_draft, p, q, g):
    """Wrong: every proposal accepted, bonus from the target."""
    bonus = torch.stack([torch.multinomial(p[n], 1, generator=g)[0] for n in num_draft.tolist()])
    return [d[:n] + [t] for d, n, t in zip(draft.tolist(), num_draft.tolist(), bonus.tolist())]


def _resample_from_target(draft, num_draft, p, q, g):
    """Wrong: the correct acceptance test, but a rejected position resamples from p, not the residual."""
    k = draft.shape[1]
    px = p[:k].gather(1, draft.t()).t()
    qx = q.gather(1, draft.t()).t()
    a = _accepted_prefix(torch.rand(draft.shape, generator=g) * qx < px, num_draft)
    last = torch.stack([torch.multinomial(p[j], 1, generator=g)[0] for j in a.tolist()])
    return [d[:j] + [t] for d, j, t in zip(draft.tolist(), a.tolist(), last.tolist())]


def _right(draft, num_draft, p, q, g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    res = rejection_sample(draft, num_draft, p.expand(len(draft), -1, -1), q.expand(len(draft), -1, -1))
    return res.to_lists()


def _right_seeded(draft, num_draft, p, q, g):
    """Every row a seeded request (seeds 5i + 2 at positions i mod 97): all its draws from counters."""
    params = [SamplingParams(seed=5 * i + 2) for i in range(len(draft))]
    seeded = SeededRows.of(params, [i % 97 for i in range(len(draft))], p.device)
    res = rejection_sample(draft, num_draft, p.expand(len(draft), -1, -1), q.expand(len(draft), -1, -1), seeded)
    return res.to_lists()


@pytest.mark.parametrize("impl,correct", [(_right, True), (_right_seeded, True), (_accept_always, False),
                                          (_resample_from_target, False)])
def test_rejection_sampling_approximates_target_distribution(impl, correct):
    """Every emitted token at position j (over rows that emitted more than j) is distributed as p_j,
    up to a sampling error bounded by tv_bound. The draft is far from the target (TV(p_0, q_0) is
    0.74): at position 0 the right sampler lands at TV 0.002 against a bound of 0.019, accepting
    always at 0.64 and resampling rejections from p instead of the residual at 0.13, so the test
    tells them apart by a wide margin (fixed seeds: the figures are reproducible)."""
    p, q, draft, num_draft = _poor_setup()
    out = impl(draft, num_draft, p, q, torch.Generator().manual_seed(1))
    misses = []
    for j in range(K + 1):
        counts = position_counts(out, j, VOCAB)
        n = int(counts.sum())
        assert n >= 200, (j, n)  # enough samples for the bound to mean something at every position
        dist, bound = tv(counts, p[j]), tv_bound(n, VOCAB)
        misses.append(dist > bound)
        if correct:
            assert dist <= bound, f"position {j}: TV {dist:.4f} > {bound:.4f} over {n} samples"
    if not correct:
        assert misses[0], "a wrong sampler passed at position 0"
    assert 0.5 * (p[0] - q[0]).abs().sum() > 0.5


@pytest.mark.parametrize("seeded", [False, True])
def test_acceptance_rate_is_the_overlap_of_draft_and_target(seeded):
    """P(accept x_0) = sum_x min(p_0(x), q_0(x)): the rate the papers derive, within 5 sigma (also
    with every row seeded: the acceptance uniforms from counters)."""
    p, q, draft, num_draft = _poor_setup(seed=2)
    torch.manual_seed(0)
    rows = SeededRows.of([SamplingParams(seed=i) for i in range(ROWS)], [3] * ROWS, p.device) if seeded else None
    res = rejection_sample(draft, num_draft, p.expand(ROWS, -1, -1), q.expand(ROWS, -1, -1), rows)
    proposing = num_draft > 0
    rate = res.num_accepted[proposing].gt(0).float().mean().item()
    want = torch.minimum(p[0], q[0]).sum().item()
    n = int(proposing.sum())
    assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / n)


def test_one_hot_draft_ngram_distribution_and_acceptance():
    """No draft probabilities (n-gram): q is one-hot at the proposal; accept with p(x), and the
    emitted token is still distributed as p."""
    g = torch.Generator().manual_seed(4)
    p = (1.2 * torch.randn(K + 1, VOCAB, generator=g)).softmax(-1)
    draft = torch.full((ROWS, K), 2, dtype=torch.int64)  # always proposes token 2
    num_draft = torch.full((ROWS,), K)
    torch.manual_seed(5)
    res = rejection_sample(draft, num_draft, p.expand(ROWS, -1, -1))
    out = res.to_lists()
    for j in range(2):  # position 1 is reached by about p_0(2) of the rows
        counts = position_counts(out, j, VOCAB)
        assert tv(counts, p[j]) <= tv_bound(int(counts.sum()), VOCAB)
    rate = res.num_accepted.gt(0).float().mean().item()
    want = p[0, 2].item()
    assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / ROWS)


def test_verify_processes_both_distributions_like_the_sampler():
    """Through verify(): temperature and top-k shape the target; the emitted tokens follow the
    processed target (none outside its top-k) even though the draft proposes excluded tokens."""
    g = torch.Generator().manual_seed(6)
    rows, k, v = 30_000, 2, 8
    logits = 2.0 * torch.randn(k + 1, v, generator=g)
    params = [SamplingParams(temperature=0.7, top_k=4)] * rows
    target = processed_probs(logits.expand(rows, -1, -1), params)
    q = torch.full((rows, k, v), 1.0 / v)  # uniform draft: half its proposals are outside the top-4
    draft = torch.randint(0, v, (rows, k), generator=g)
    torch.manual_seed(7)
    res = verify(draft, torch.full((rows,), k), logits.expand(rows, -1, -1), params, q)
    out = res.to_lists()
    kept = logits[0].topk(4).indices
    want = torch.zeros(v)
    want[kept] = (logits[0, kept] / 0.7).softmax(-1)
    assert torch.allclose(target[0, 0], want, atol=1e-6)
    counts = position_counts(out, 0, v)
    assert counts[[t for t in range(v) if t not in kept.tolist()]].sum() == 0
    assert tv(counts, want) <= tv_bound(rows, v)


# -- seeds, mixing, edge cases ---------------------------------------------------------------------
def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(8)
    k, v = 4, 7
    p = torch.randn(3, k + 1, v, generator=g).softmax(-1)
    q = torch.randn(3, k, v, generator=g).softmax(-1)
    draft = torch.randint(0, v, (3, k), generator=g)
    n = torch.tensor([4, 2, 3])

    def run(other_seed: int):
        params = [SamplingParams(seed=other_seed), SamplingParams(), SamplingParams(seed=123)]
        seeded = SeededRows.of(params, [other_seed, 0, 17], p.device)
        return rejection_sample(draft, n, p, q, seeded).to_lists()[2]

    torch.manual_seed(0)
    first = run(1)
    torch.manual_seed(99)  # the global RNG and the other seeded row both change
    assert run(2) == first


def test_mixed_batch_greedy_rows_take_the_argmax_path():
    g = torch.Generator().manual_seed(9)
    b, k, v = 6, 3, 9
    logits = torch.randn(b, k + 1, v, generator=g)
    argmax = logits.argmax(-1)
    draft = argmax[:, :k].clone()
    draft[:, 2] = (draft[:, 2] + 1) % v  # rows agree on two tokens, then not
    params = [SamplingParams(temperature=0 if i % 2 == 0 else 1.0) for i in range(b)]
    q = torch.randn(b, k, v, generator=g).softmax(-1)
    out = verify(draft, torch.full((b,), k), logits, params, q).to_lists()
    for i in range(0, b, 2):
        assert out[i] == argmax[i, :3].tolist()
    for i in range(1, b, 2):
        assert 1 <= len(out[i]) <= k + 1 and all(0 <= t < v for t in out[i])


def _point_mass(v: int, token: int) -> torch.Tensor:
    out = torch.zeros(v)
    out[token] = 1.0
    return out


def test_k1_all_accepted_gives_the_bonus_token_from_position_k():
    v = 5
    p = torch.stack([_point_mass(v, 3), _point_mass(v, 4)])[None]  # [1, 2, V]
    q = _point_mass(v, 3)[None, None]  # the draft proposes 3, which the target is sure of
    res = rejection_sample(torch.tensor([[3]]), torch.tensor([1]), p, q)
    assert res.to_lists() == [[3, 4]] and res.num_accepted.tolist() == [1]
    greedy = greedy_verify(torch.tensor([[3]]), torch.tensor([1]), torch.tensor([[3, 4]]))
    assert greedy.to_lists() == [[3, 4]]


def test_rejection_emits_from_the_residual():
    """Target certain of 1, draft certain of 0: token 0 is always rejected and the residual
    max(0, p - q) is all on 1."""
    v = 4
    p = torch.stack([_point_mass(v, 1), _point_mass(v, 2)])[None].expand(200, -1, -1)
    q = _point_mass(v, 0)[None, None].expand(200, -1, -1)
    res = rejection_sample(torch.zeros(200, 1, dtype=torch.int64), torch.ones(200, dtype=torch.int64), p, q)
    assert res.to_lists() == [[1]] * 200


def test_rows_without_proposals_emit_one_target_token():
    v, k = 6, 3
    p = torch.stack([_point_mass(v, t) for t in (5, 1, 2, 3)])[None].expand(2, -1, -1)
    q = torch.full((2, k, v), 1.0 / v)
    draft = torch.tensor([[5, 1, 2], [4, 4, 4]])
    res = rejection_sample(draft, torch.tensor([0, 3]), p, q)
    out = res.to_lists()
    assert out[0] == [5]  # no proposals: a plain decode step's token
    assert out[1] == [5]  # 4 is impossible for the target: rejected, residual on 5
    assert res.token_ids[0].tolist() == [5, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]
    empty = rejection_sample(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), p[:, :1], None)
    assert empty.to_lists() == [[5], [5]]
    assert greedy_verify(draft, torch.tensor([0, 3]), torch.tensor([[5, 1, 2, 3]] * 2)).to_lists() == [[5], [5]]


def test_all_accepted_up_to_a_short_row_then_bonus_at_its_own_length():
    """A row proposing 2 of k=4 that are all accepted takes its bonus from p_2, not p_4."""
    v, k = 6, 4
    p = torch.stack([_point_mass(v, t) for t in (0, 1, 2, 3, 4)])[None]
    q = torch.stack([_point_mass(v, t) for t in (0, 1, 5, 5)])[None]
    res = rejection_sample(torch.tensor([[0, 1, 5, 5]]), torch.tensor([2]), p, q)
    assert res.to_lists() == [[0, 1, 2]]


@pytest.mark.gpu
def test_verify_never_waits_for_the_device():
    """A mixed batch with seeded rows and a one-hot draft, on CUDA: any device sync inside raises."""
    dev = torch.device("cuda")
    b, k, v = 8, 4, 1000
    logits = torch.randn(b, k + 1, v, device=dev)
    q = torch.randn(b, k, v, device=dev).softmax(-1)
    draft = torch.randint(0, v, (b, k), device=dev)
    n = torch.tensor([4, 0, 2, 4, 1, 3, 4, 4], device=dev)
    params = [SamplingParams(temperature=0 if i % 3 == 0 else 0.8, top_k=50 if i % 2 else 0) for i in range(b)]
    params = [SamplingParams(temperature=p.temperature, top_k=p.top_k, seed=i if i % 2 else None)
              for i, p in enumerate(params)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seeded = SeededRows.of(params, [3 * i for i in range(b)], dev)
        res = verify(draft, n, logits, params, q, seeded)
        one_hot = rejection_sample(draft, n, processed_probs(logits, params), None, seeded)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(1 <= len(r) <= k + 1 for r in res.to_lists() + one_hot.to_lists())
