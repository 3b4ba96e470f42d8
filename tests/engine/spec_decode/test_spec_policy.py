"""The ``auto`` k policy's arithmetic (engine/spec_decode/policy.py), on hand-computed cases and
injected step costs: no timing is measured here."""

from __future__ import annotations

import pytest

from engine.spec_decode import policy as P
from engine.spec_decode.policy import AcceptanceEstimate, SpecPolicy, StepCosts, choose_k, expected_tokens


def _costs(sizes=(1,), decode=(1.0,), draft=(0.1,), verify=None, k_max: int = 3, catch_up: bool = True,
           per_token: bool = True) -> StepCosts:
    """Per batch size: a decode of ``decode``, a draft of k tokens of k * ``draft`` (``per_token``,
    a model drafter's k forwards; else ``draft`` for any k, n-gram's one lookup), a verify of k + 1
    tokens of decode * (1 + 0.1 k) unless ``verify`` says otherwise."""
    verify = verify or {k: [d * (1 + 0.1 * k) for d in decode] for k in range(1, k_max + 1)}
    drafts = {k: [d * (k if per_token else 1) for d in draft] for k in verify}
    return StepCosts(list(sizes), list(decode), drafts, verify, catch_up=catch_up)


def test_expected_tokens_by_hand():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0, 1.0], 2) == 3.0
    assert expected_tokens([0.9, 0.5, 0.0], 3) == pytest.approx(1 + 0.9 + 0.45)


def test_choose_k_by_hand():
    costs = _costs()  # decode 1, draft 0.1 per forward, verify 1.1 / 1.2 / 1.3
    # rates 0.5: k=1 1.5 / (0.1 * 1.5 + 1.1) = 1.2; k=2 1.75 / (0.1 * 2.25 + 1.2) = 1.228;
    # k=3 1.875 / (0.1 * 3.125 + 1.3) = 1.163 (the draft's catch-up after a fully accepted round counted)
    assert choose_k([0.5] * 3, costs, 1, 3) == 2
    assert choose_k([0.9] * 3, costs, 1, 3) == 3
    assert choose_k([0.9] * 3, costs, 1, 2) == 2  # never past k_max
    # rates 0.05: k=1 gives 1.05 / 1.205 = 0.87 of plain decoding's tokens per second
    assert choose_k([0.05] * 3, costs, 1, 3) == 0
    # A perfect drafter that costs as much as the target never pays: (k + 1) / (k + 1 + 0.1 k) < 1
    assert choose_k([1.0] * 3, _costs(draft=(1.0,)), 1, 3) == 0
    # Within MIN_GAIN of plain decoding is not worth it: 1 + a = 1.01 * (0.0 + 1.0) at a zero-cost draft
    assert choose_k([0.01, 0, 0], _costs(draft=(0.0,), verify={k: [1.0] for k in (1, 2, 3)}), 1, 3) == 0


def test_a_draft_models_catch_up_is_counted_and_ngrams_is_not():
    ngram = _costs(draft=(0.3,), catch_up=False, per_token=False)
    assert ngram.step_seconds(1, 3, p_full=0.5) == pytest.approx(0.3 + 1.3)
    # A fully accepted round (here half of them) leaves the draft one token to catch up: a forward more.
    assert _costs(draft=(0.3,)).step_seconds(1, 3, p_full=0.5) == pytest.approx(0.3 * 3.5 + 1.3)
    assert _costs(draft=(0.3,)).step_seconds(1, 0) == 1.0


def test_batch_size_dependence_through_the_cost_table():
    """Batch 1 is memory-bound (a verify of k + 1 tokens costs about one decode); at 16 the verify
    costs k + 1 decodes, so even a good drafter does not pay there."""
    costs = _costs(sizes=(1, 16), decode=(1.0, 2.0), draft=(0.1, 0.2),
                   verify={k: [1 + 0.1 * k, 2.0 * (k + 1)] for k in (1, 2, 3)})
    rates = [0.9] * 3
    assert [choose_k(rates, costs, n, 3) for n in (1, 2, 16, 40)] == [3, 0, 0, 0]
    assert costs.index(2) == costs.index(16) == 1 and costs.index(40) == 1  # the next measured size, else the last
    assert costs.step_seconds(5, 0) == 2.0


def test_step_costs_checks_its_table():
    with pytest.raises(ValueError, match="ascending"):
        StepCosts([4, 1], [1.0, 1.0], {1: [0.1, 0.1]}, {1: [1.0, 1.0]})
    with pytest.raises(ValueError, match="every k"):
        StepCosts([1, 4], [1.0, 1.0], {1: [0.1, 0.1]}, {1: [1.0]})
    with pytest.raises(ValueError, match="every k"):
        StepCosts([1, 4], [1.0, 1.0], {1: [0.1, 0.1]}, {1: [1.0, 1.0], 2: [1.0, 1.0]})


def test_acceptance_estimate_counts_conditional_rates():
    est = AcceptanceEstimate(3, decay=1.0)
    assert est.rates == [P.PRIOR_RATE] * 3  # the prior before any evidence
    # Asked 3, accepted 3: positions 0-2 reached and accepted. Asked 3, accepted 1: 0 hit, 1 missed.
    # Asked 2, accepted 0 (an n-gram without a match proposes nothing): a miss at 0.
    est.observe([3, 3, 2], [3, 1, 0])
    assert est.trials == [3, 2, 1] and est.hits == [2, 1, 1]
    w, p = P.PRIOR_TRIALS, P.PRIOR_RATE
    assert est.rates == pytest.approx([(2 + p * w) / (3 + w), (1 + p * w) / (2 + w), (1 + p * w) / (1 + w)])
    assert est.num_observed == 3
    est.observe([0], [0])  # a sequence asked for nothing is no evidence
    assert est.num_observed == 3 and est.trials == [3, 2, 1]
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        est.observe([2], [3])


def test_acceptance_estimate_decays_old_evidence():
    est = AcceptanceEstimate(1, decay=0.5)
    est.observe([1], [1])
    est.observe([1], [0])
    assert (est.hits, est.trials) == ([0.5], [1.5])


def _drive(policy: SpecPolicy, steps: int, agree, n: int = 1) -> list[int]:
    """k per step of a batch of ``n`` whose drafter's first agree(step) tokens are accepted."""
    ks = []
    for t in range(steps):
        k = policy.k_for_step(n)
        ks.append(k)
        if k:
            policy.observe([k] * n, [min(k, agree(t))] * n)
    return ks


def test_a_drafter_that_never_agrees_drives_k_to_0_and_is_probed_ever_less_often():
    policy = SpecPolicy(3, 16, _costs())
    ks = _drive(policy, 1000, lambda t: 0)
    warm = P.WARMUP_TRIALS
    assert ks[:warm] == [3] * warm  # the first steps speculate, whatever the costs
    probes = [t for t in range(warm, len(ks)) if ks[t]]
    assert all(ks[t] == 3 for t in probes)  # a probe drafts k_max, so every position is estimated
    # Plain steps between probes: 15 after the warm-up, then the interval doubles up to PROBE_MAX.
    gaps = [b - a - 1 for a, b in zip([warm - 1] + probes, probes)]
    assert gaps == [15, 31, 63, 127, 255, 255][: len(gaps)] and len(gaps) >= 5
    assert policy.num_probes == len(probes) and policy.steps_by_k[0] == 1000 - warm - len(probes)
    assert policy.acceptance.rates[0] < 0.15


def test_an_always_agreeing_drafter_keeps_k_max():
    policy = SpecPolicy(3, 16, _costs())
    assert _drive(policy, 300, lambda t: 3) == [3] * 300
    assert policy.num_probes == 0 and policy.steps_by_k == [0, 0, 0, 300]


def test_a_probe_finds_speculation_paying_again():
    """The drafter never agrees for 400 steps, then always: the probes bring k back to k_max, and the
    probe interval back to its minimum."""
    policy = SpecPolicy(3, 16, _costs())
    ks = _drive(policy, 2000, lambda t: 0 if t < 400 else 3, n=4)
    assert 0 in ks[:400] and ks[-100:] == [3] * 100
    assert policy.probe_interval == P.PROBE_MIN


def test_batches_past_max_batch_size_and_by_cost():
    costs = _costs(sizes=(1, 16), decode=(1.0, 2.0), draft=(0.1, 0.2),
                   verify={k: [1 + 0.1 * k, 2.0 * (k + 1)] for k in (1, 2, 3)})
    policy = SpecPolicy(3, 16, costs)
    _drive(policy, 50, lambda t: 3)  # warmed up on a drafter that always agrees
    assert [policy.k_for_step(n) for n in (1, 16, 17)] == [3, 0, 0]
    d = policy.as_dict()
    assert d["last_k"] == 0  # the step of 16
    assert d["policy"] == "auto" and d["costs"]["batch_sizes"] == [1, 16] and d["costs"]["verify_s"]["3"] == [1.3, 8.0]
    assert sum(d["steps_by_k"]) == 52  # the step of 17 sequences is past max_batch_size, not the policy's
