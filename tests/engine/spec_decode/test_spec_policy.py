"""The ``auto`` k policy's arithmetic (engine/spec_decode/policy.py), on hand-computed cases and
injected step costs: no timing is measured here."""

from __future__ import annotations

import random
import statistics

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
    # Asked 2, accepted 0 (both proposed, proposed omitted meaning as many as asked): a miss at 0.
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


def test_a_round_without_a_proposal_is_a_match_miss_not_a_rejection():
    """An n-gram lookup without a match proposes nothing: that lowers the match rate, and says nothing
    about how often a proposal is accepted (it was counted a miss at position 0, which turned a
    drafter whose matches were right 9 times in 10 off: the H200's wikitext n-gram auto run)."""
    est = AcceptanceEstimate(4, decay=1.0)
    # Sequence 0 found no match; sequence 1 proposed 4 and had 2 accepted; sequence 2's context
    # ended after 2 proposed tokens, both accepted: position 2, asked for and lacking, is its miss.
    est.observe([4, 4, 4], [0, 2, 2], [0, 4, 2])
    assert (est.match_trials, est.match_hits) == (3, 2) and est.num_observed == 3
    assert est.trials == [2, 2, 2, 0] and est.hits == [2, 2, 0, 0]
    w = P.PRIOR_TRIALS
    assert est.match == pytest.approx((2 + P.PRIOR_MATCH * w) / (3 + w))
    for _ in range(30):  # a long stretch without matches: the match rate falls, acceptance stays
        est.observe([4], [0], [0])
    assert est.match < 0.15 and est.rates[:2] == pytest.approx([(2 + P.PRIOR_RATE * w) / (2 + w)] * 2)
    with pytest.raises(ValueError, match="accepted 1 of 0 proposed of 4"):
        est.observe([4], [1], [0])
    with pytest.raises(ValueError, match="3 proposal counts"):
        est.observe([4], [1], [1, 1, 1])


def test_choose_k_weighs_the_match_rate_by_hand():
    """Lookup 0.05, verify 1 + 0.1 k, plain decode 1 (one token a step); drafts accepted at 0.9 each
    but found in one round of ten. Batch 1: k=3 gives 1 + 0.1 * 2.439 = 1.244 tokens in
    0.05 + 0.1 * 1.3 + 0.9 * 1.0 = 1.08 (a round without a match is a lookup and a plain step) =
    1.152 tokens per unit, over plain's 1.02. Counted as rejections at position 0 (0.09, 0.9, 0.9)
    every round would pay a verify: 1.244 / 1.35 = 0.92, plain. At 16 sequences some sequence
    matches in 1 - 0.9^16 = 81% of the rounds, which then all pay the verify: plain."""
    costs = _costs(draft=(0.05,), catch_up=False, per_token=False)
    assert costs.step_seconds(1, 3, p_any=0.1) == pytest.approx(0.05 + 0.1 * 1.3 + 0.9 * 1.0)
    assert choose_k([0.9] * 3, costs, 1, 3, match=0.1) == 3
    assert choose_k([0.09, 0.9, 0.9], costs, 1, 3) == 0
    assert choose_k([0.9] * 3, costs, 16, 3, match=0.1) == 0
    # A round without a proposal is a one-token plain step: dearer than the multi-step decode's token.
    dear = StepCosts([1], [1.0], {k: [0.05] for k in (1, 2, 3)}, {k: [1 + 0.1 * k] for k in (1, 2, 3)},
                     catch_up=False, decode_one=[1.2])
    assert dear.step_seconds(1, 3, p_any=0.1) == pytest.approx(0.05 + 0.13 + 0.9 * 1.2)
    assert choose_k([0.9] * 3, dear, 1, 3, match=0.1) == 0  # 1.244 / 1.26 < 1.02
    with pytest.raises(ValueError, match="one-token decode cost"):
        StepCosts([1, 2], [1.0, 1.0], {1: [0.1, 0.1]}, {1: [1.0, 1.0]}, decode_one=[1.0])


def test_step_overheads_are_robust_medians_per_batch_size_and_kind():
    costs = _costs(sizes=(1, 16), decode=(1.0, 2.0), draft=(0.1, 0.2), k_max=3)  # verify 1.3 / 2.6 at k=3
    policy = SpecPolicy(3, 16, costs)
    assert policy.overheads.at(1) == (0.0, 0.0, 0.0, 0.0)  # nothing seen: the table alone
    for seconds in (8.8, 8.8, 80.0):  # 8-token plain steps; one stalled
        policy.observe_step(1, 0, seconds, steps=8)
    for _ in range(3):
        policy.observe_step(1, 3, 0.3 + 1.3 + 0.5)  # a verify round, 0.5 over the table
        policy.observe_step(1, 3, 0.3 + 1.0 + 0.25, proposed=False)  # no proposal: lookup + one-token step
    policy.observe_step(17, 0, 99.0)  # past max_batch_size: not the policy's
    assert policy.overheads.at(1) == pytest.approx((0.1, 0.5, 0.25, 0.0))
    assert policy.overheads.at(16) == (0.0, 0.0, 0.0, 0.0)
    assert policy.as_dict()["overhead_s"]["verify"] == [pytest.approx(0.5), None]
    # The overheads enter the choice: a verify round's 0.5 makes k=3 at rates 0.5 lose to plain
    # (1.875 / (0.3 + 0.1 * 3.125 + 1.8) = 0.75 against 1 / 1.1 = 0.91).
    assert choose_k([0.5] * 3, costs, 1, 3) == 2
    assert choose_k([0.5] * 3, costs, 1, 3, overhead=policy.overheads.at(1)) == 0
    assert SpecPolicy(3, 16, costs, calibrate=False).overheads is None


# The H200 run of 2026-11-30 (benchmarks/2026-11-30-h200x2-s11/bg/spec/spec.jsonl), SmolLM2-135M bf16,
# batch 1, n-gram k_max 4: the engine's startup table ("policy" of the wikitext auto row), seconds.
H200_NGRAM_B1 = StepCosts([1], [0.000509], {k: [2.05e-5] for k in range(1, 5)},
                          {1: [0.001017], 2: [0.001055], 3: [0.001037], 4: [0.001022]}, catch_up=False)
# What an engine step really took there, all in (scheduling, appending), solved from the fixed-k rows:
# plain 1905 tok/s with 8-token steps; a verify round 0.91 ms and a round without a match 0.88 ms
# (wikitext k=4: 76% of rounds matched at 0.242 ms a token and 3.74 tokens a round; grounded k=4:
# 19% matched at 0.726 ms a token and 1.22 tokens a round).
PLAIN_TOKEN_S, VERIFY_ROUND_S, UNMATCHED_ROUND_S = 1 / 1905.0, 0.00091, 0.00088
# Per workload, from the fixed k=4 rows: the share of rounds with a match and, of the matched ones,
# the share that reached position j accepted (accepted_per_position / num_drafts).
WIKITEXT = (0.761, [0.914, 0.895, 0.895, 0.895])
GSM8K = (0.386, [0.689, 0.451, 0.303, 0.205])
GROUNDED = (0.190, [0.575, 0.338, 0.163, 0.087])


def _replay(policy: SpecPolicy, workload, tokens: int, early: int = 0, seed: int = 0,
            steps_per_plain: int = 8) -> tuple[float, list[tuple[int, bool]]]:
    """Drive ``policy`` as the engine does for one batch-1 request of ``tokens`` tokens: a round
    matches with the workload's rate (never in the first ``early`` tokens: the start of a
    continuation that repeats nothing yet) and accepts a prefix drawn from its reach; every step's
    all-in time goes to observe_step, and after a plain step its n-gram round is observed
    (worker.py's _unrun_round). Returns (tokens per second, [(k, matched)] per step)."""
    import random

    rng = random.Random(seed)
    match, reach = workload
    done, seconds, steps = 0, 0.0, []
    while done < tokens:
        k = policy.k_for_step(1)
        matched = done >= early and rng.random() < match
        u = rng.random()
        accepted = sum(u < r for r in reach[: k or policy.k_max]) if matched else 0
        if k == 0:
            policy.observe_step(1, 0, steps_per_plain * PLAIN_TOKEN_S, steps=steps_per_plain)
            policy.observe([policy.k_max], [accepted], [policy.k_max if matched else 0])
            done, seconds = done + steps_per_plain, seconds + steps_per_plain * PLAIN_TOKEN_S
            steps.append((0, matched))
            continue
        policy.observe([k], [accepted], [k if matched else 0])
        cost = VERIFY_ROUND_S if matched else UNMATCHED_ROUND_S
        policy.observe_step(1, k, cost, proposed=matched)
        done, seconds = done + accepted + 1, seconds + cost
        steps.append((k, matched))
    return done / seconds, steps


def test_replay_of_the_h200_wikitext_ngram_run_speculates_where_the_lookup_matches():
    """The recorded failure: rounds without a match at the start of a continuation (here its first
    8 tokens) counted as rejections at position 0, the estimate there fell, and the policy decoded
    plainly for 15 and then 31 steps (steps_by_k [46, 0, 0, 0, 37] on the H200): auto gave 1.31x
    where k=4 gave 2.17x. Now a plain step may stand in for a stretch of unmatched rounds (8 tokens
    for 4.2 ms against 7 ms), and once the lookup matches again every step speculates at k=4."""
    policy = SpecPolicy(4, 16, H200_NGRAM_B1)
    runs = [_replay(policy, WIKITEXT, n, early=8, seed=s) for s, n in enumerate((8, 256, 256))]
    for _, steps in runs[1:]:
        first = next(i for i, (_, matched) in enumerate(steps) if matched)
        assert [k for k, _ in steps[first + 2:]] == [4] * len(steps[first + 2:])
    assert policy.num_probes == 0
    assert all(tok_s * PLAIN_TOKEN_S > 1.9 for tok_s, _ in runs[1:])  # fixed k=4 on the H200: 2.17x
    # Its matches spread evenly (no unmatched start), it never decodes plainly after the warm-up.
    steady = SpecPolicy(4, 16, H200_NGRAM_B1)
    assert all(k == 4 for n in (8, 256, 256) for k, _ in _replay(steady, WIKITEXT, n)[1])


@pytest.mark.parametrize("workload", [GSM8K, GROUNDED], ids=["gsm8k", "grounded"])
def test_replay_of_the_h200_gsm8k_and_grounded_ngram_runs_stays_plain(workload):
    """Where fixed k lost on the H200 (0.84x and 0.72x at k=4, batch 1), auto decodes plainly but
    where a streak of matches makes a stretch of rounds pay: its replay holds plain decoding's speed.
    The startup table alone would speculate on gsm8k (1 + 0.386 * 1.65 tokens in 0.02 + 0.386 * 1.02
    + 0.614 * 0.51 ms beats a 0.51 ms token); the measured step times, which count the engine's work
    per round, say no."""
    speedups = []
    for seed in range(10):  # matches drawn independently: a streak may tempt the policy, briefly
        policy = SpecPolicy(4, 16, H200_NGRAM_B1)
        runs = [_replay(policy, workload, n, seed=100 * seed + s) for s, n in enumerate((8, 256, 256))]
        speedups += [tok_s * PLAIN_TOKEN_S for tok_s, _ in runs[1:]]
    assert sum(speedups) / len(speedups) > 0.97 and min(speedups) > 0.9
    match, reach = workload
    rates = [r / prev for r, prev in zip(reach, [1.0] + reach)]  # accepted at j given 0..j-1 were
    if workload is GSM8K:  # the table alone would take the loss
        assert choose_k(rates, H200_NGRAM_B1, 1, 4, match=match) > 0
    assert choose_k(rates, H200_NGRAM_B1, 1, 4, match=match, overhead=policy.overheads.at(1)) == 0


def _rounds_costs(sizes=(1, 16), k_max: int = 3, rounds: bool = True) -> StepCosts:
    """A launch-bound GPU's shape (test_spec_rounds_auto.py's): a plain token 1, one round through the
    host 3 + 0.05 k, a lookup 0.01, a round of a rounds step 1.2 (``rounds``: at every size)."""
    n = len(sizes)
    return StepCosts(list(sizes), [1.0] * n, {k: [0.01] * n for k in range(1, k_max + 1)},
                     {k: [3.0 + 0.05 * k] * n for k in range(1, k_max + 1)}, catch_up=False,
                     decode_one=[1.0] * n, rounds=[1.2] * n if rounds else [])


def test_slowest_of_n_by_hand():
    assert P.slowest_of(1) == 0.0
    assert P.slowest_of(16) == pytest.approx(1.5647, abs=1e-3)  # the normal quantile 1/17
    assert all(P.slowest_of(n) < P.slowest_of(n + 1) for n in range(1, 64))


def test_choose_k_costs_a_rounds_step_by_the_slowest_sequence():
    """1 + 0.5 (0.6 + 0.36 + 0.216) = 1.588 tokens a round of the mean sequence beat plain decoding's
    1.2 a round; with a spread of 0.3 between sequences the slowest of 16 emits 1.588 - 1.565 * 0.3 =
    1.118: a rounds step of 16 loses, of one (no other to wait for) still pays."""
    rates = [0.6] * 3
    costs = _rounds_costs()
    assert choose_k(rates, costs, 16, 3, match=0.5) == 3
    assert choose_k(rates, costs, 16, 3, match=0.5, spread=0.3) == 0
    assert choose_k(rates, costs, 16, 3, match=0.5, spread=0.1) == 3  # 1.588 - 0.156 = 1.43 still pays
    assert choose_k(rates, costs, 1, 3, match=0.5, spread=0.3) == 3


def test_choose_k_costs_a_one_round_step_by_the_slowest_sequence_without_chance():
    """num_rounds 1 (no rounds table): a round of k + 1 tokens costs 1 + 0.1 k against a plain token's
    1. The mean sequence's 1 + 0.5 (0.6 + 0.36 + 0.216) = 1.588 tokens at k = 3 pay (1.21 a unit);
    with a spread of 0.3 the slowest of 16 emits 1.588 - 1.565 * 0.3 = 1.118 (0.85 a unit), and no
    k pays; a batch of one still speculates. One round leaves sequences of the same rates only a few
    tokens apart, so the rounds' chance horizon does not cost it."""
    rates = [0.6] * 3
    one_round = _costs(sizes=(1, 16), decode=(1.0, 1.0), draft=(0.01, 0.01), per_token=False)
    assert choose_k(rates, one_round, 16, 3, match=0.5) > 0
    assert choose_k(rates, one_round, 16, 3, match=0.5, spread=0.3) == 0
    assert choose_k(rates, one_round, 1, 3, match=0.5, spread=0.3) > 0
    assert choose_k(rates, one_round, 16, 3, match=0.5, horizon=1.0) == choose_k(rates, one_round, 16, 3, match=0.5)


def test_row_spread_sees_lasting_differences_not_streaks():
    """RowSpread: sequences that keep their own rates (row i emits 1 + i % 4 tokens every round) give
    the covariance of their means two steps apart, weighed by its 15 degrees of freedom against the
    prior's 8, once the covariances' sum is SPREAD_Z standard errors above none (one covariance of
    15: sqrt(15 / 2) = 2.7 of them, three 4.6); sequences whose good rounds move from step to step
    (a streak in one step, none two steps later) give none; fewer than 3 sequences in common say
    nothing."""
    lasting = P.RowSpread()
    ids = list(range(16))
    for _ in range(3):
        lasting.observe(ids, [[1 + i % 4] * 4 for i in ids])
    assert lasting.weight == 15 and lasting.spread == 0.0
    for _ in range(2):
        lasting.observe(ids, [[1 + i % 4] * 4 for i in ids])
    var = statistics.variance([1 + i % 4 for i in ids])
    assert lasting.weight == pytest.approx(15 * (1 + P.DECAY + P.DECAY ** 2))
    assert lasting.spread == pytest.approx((lasting.weight * var / (lasting.weight + P.SPREAD_PRIOR)) ** 0.5)
    moving = P.RowSpread()
    for t in range(6):
        moving.observe(ids, [[4 if (i + t) % 3 == 0 else 1] * 4 for i in ids])
    assert moving.weight > 0 and moving.spread == 0.0
    few = P.RowSpread()
    for t in range(4):
        few.observe([t, 100, 101], [[1], [4], [2]])  # sequence t is new each step: 2 in common
    assert few.weight == 0 and few.spread == 0.0


def test_row_spread_learns_from_one_round_steps_past_a_streak_and_not_from_chance():
    """RowSpread.observe_round: each one-round step's tokens against each sequence's mean over its
    rounds ROUND_LAG and more before. Sequences that keep their own rates (row i emits 1 + i % 4 every
    round) give nothing for ROUND_LAG steps, then the variance of their rates once it is SPREAD_Z
    standard errors above none; sequences of the same rate whose tokens vary by chance alone, or in
    streaks shorter than ROUND_LAG rounds, give none; a sequence that left the batch is dropped."""
    ids = list(range(16))
    lasting = P.RowSpread()
    for _ in range(P.ROUND_LAG):
        lasting.observe_round(ids, [1 + i % 4 for i in ids])
    assert lasting.weight == 0 and lasting.spread == 0.0
    for _ in range(20):
        lasting.observe_round(ids, [1 + i % 4 for i in ids])
    var = statistics.variance([1 + i % 4 for i in ids])
    assert lasting.spread == pytest.approx((lasting.weight * var / (lasting.weight + P.SPREAD_PRIOR)) ** 0.5)
    rng = random.Random(5)
    chance = P.RowSpread()
    for _ in range(300):
        chance.observe_round(ids, [rng.choice((1, 1, 2, 4)) for _ in ids])
    assert chance.weight > 0 and chance.spread == 0.0
    streaks = P.RowSpread()  # a row's match repeats its last with extra chance 0.6 (spec_policy_sim's "~")
    state = [False] * 16
    for _ in range(300):
        state = [rng.random() < (0.6 if last else 0.0) + 0.4 * 0.3 for last in state]
        streaks.observe_round(ids, [4 if m else 1 for m in state])
    assert streaks.weight > 0 and streaks.spread == 0.0
    lasting.observe_round(ids[1:], [1 + i % 4 for i in ids[1:]])
    assert 0 not in lasting.recent and len(lasting.recent) == 15


def test_a_one_round_batch_whose_sequences_differ_lastingly_decodes_plainly_at_16_not_at_1():
    """SpecPolicy.observe_tokens (the worker's one-round steps): 16 sequences that keep emitting 1 or
    4 tokens a round turn batches of 16 to plain decoding, a batch of one still speculates."""
    policy = SpecPolicy(3, 16, _costs(sizes=(1, 16), decode=(1.0, 1.0), draft=(0.01, 0.01), per_token=False),
                        calibrate=False)
    for _ in range(4):
        policy.observe([3] * 16, [1] * 16, [3] * 16)
    assert policy.k_for_step(16) > 0 and policy.k_for_step(1) > 0
    ids = list(range(16))
    for _ in range(P.ROUND_LAG + 4):
        policy.observe_tokens(ids, [4 if i % 2 else 1 for i in ids])
    assert policy.spread.spread > 1.0 and policy.horizon == 0.0
    assert policy.k_for_step(16) == 0 and policy.k_for_step(1) > 0


def test_a_batch_whose_sequences_differ_lastingly_decodes_plainly_at_16_not_at_1():
    """SpecPolicy: past the warm-up with a drafter whose mean sequence pays in rounds, steps of R
    rounds whose 16 sequences keep emitting 1 or 4 tokens a round turn batches of 16 to plain
    decoding (the slowest decides when the batch ends); a batch of one still speculates."""
    policy = SpecPolicy(3, 16, _rounds_costs(), calibrate=False)
    for _ in range(4):
        policy.observe([3] * 16, [1] * 16, [3] * 16)  # about 1 + 0.55 (1 + ...) tokens a round
    assert policy.k_for_step(16) == 3 and policy.k_for_step(1) == 3
    ids = list(range(16))
    for _ in range(5):  # three covariances: SPREAD_Z standard errors above none
        policy.observe_rows(ids, [[4] * 4 if i % 2 else [1] * 4 for i in ids])
    assert policy.spread.spread > 1.0 and policy.as_dict()["row_spread"] == policy.spread.spread
    assert policy.k_for_step(16) == 0 and policy.k_for_step(1) == 3


def test_round_variance_by_enumeration():
    """round_variance: the variance of 1 + the accepted drafts (1 without a proposal), from the
    distribution written out: a round stops at its first rejected position, or after all k."""
    rates, k, match = [0.7, 0.6, 0.9, 0.5], 3, 0.4
    probs, reach = {1: 1.0 - match}, match
    for a in range(k + 1):
        stop = 1.0 - rates[a] if a < k else 1.0
        probs[1 + a] = probs.get(1 + a, 0.0) + reach * stop
        reach *= rates[a]
    mean = sum(t * p for t, p in probs.items())
    assert sum(probs.values()) == pytest.approx(1.0)
    assert mean == pytest.approx(1.0 + match * (expected_tokens(rates, k) - 1.0))
    assert P.round_variance(rates, k, match) == pytest.approx(sum(p * (t - mean) ** 2 for t, p in probs.items()))
    assert P.round_variance([1.0] * 3, 3) == 0.0 and P.round_variance([0.0] * 3, 3, 0.5) == 0.0


def test_a_rounds_step_is_costed_with_chance_spread_until_row_spread_has_evidence():
    """choose_k's horizon: sequences of the same rates still end a rounds step apart by chance, and a
    fixed batch waits for its slowest. 1 + 0.5 (0.6 + 0.36 + 0.216) = 1.588 tokens a round of the mean
    sequence beat plain decoding's 1.2 a round; chance over 8 rounds takes 1.565 * sqrt(var / 8) off
    at 16 (a loss), nothing at 1 (no other sequence to wait for), less over 64 rounds (pays).
    SpecPolicy.horizon is its num_rounds * HORIZON_STEPS until RowSpread has seen rounds steps two
    apart, then 0 (the lasting spread alone)."""
    rates, costs = [0.6] * 3, _rounds_costs()
    var = P.round_variance(rates, 3, 0.5)
    assert 1.588 - P.slowest_of(16) * (var / 8) ** 0.5 < 1.2 < 1.588 - P.slowest_of(16) * (var / 64) ** 0.5
    assert choose_k(rates, costs, 16, 3, match=0.5, horizon=8) == 0
    assert choose_k(rates, costs, 16, 3, match=0.5, horizon=64) == 3
    assert choose_k(rates, costs, 1, 3, match=0.5, horizon=8) == 3
    policy = SpecPolicy(3, 16, costs, calibrate=False, num_rounds=4)
    assert policy.horizon == 4 * P.HORIZON_STEPS
    ids = list(range(16))
    for _ in range(3):
        policy.observe_rows(ids, [[2] * 4 for _ in ids])
    assert policy.spread.weight > 0 and policy.horizon == 0.0


def test_hopeful_and_long_memory_match_rates():
    """After 200 rounds that all matched and then 30 without a match, the decayed match rate has
    fallen far, the long-memory one (LONG_DECAY) much less; the hopeful one lies LOOKUP_Z binomial
    standard errors above the estimate and comes closer as the evidence grows."""
    est = AcceptanceEstimate(3)
    hopeful_prior = est.hopeful_match(1.0)
    assert hopeful_prior == 1.0  # the prior: a drafter proposes until seen otherwise
    for _ in range(200):
        est.observe([3], [1], [3])
    for _ in range(30):
        est.observe([3], [0], [0])
    assert est.match < 0.3 < 0.75 < est.long_match
    m, w = est.match, est.match_trials + est.prior_trials
    assert est.hopeful_match(1.5) == pytest.approx(m + 1.5 * (m * (1 - m) / w) ** 0.5)
    few = AcceptanceEstimate(3)
    few.observe([3], [0], [0])
    few.observe([3], [0], [0])
    assert few.hopeful_match(1.0) - few.match > est.hopeful_match(1.0) - est.match


def test_lookups_spend_a_share_of_the_plain_steps_time_near_or_far():
    """SpecPolicy.lookup_due: a fresh policy (the prior: matches) looks up after its first plain step,
    then spends LOOKUP_SHARE_NEAR of the plain steps' seconds on lookups at their measured cost; once
    neither a hopeful nor a long-memory match rate would speculate (here: every proposal rejected),
    LOOKUP_SHARE_FAR."""
    costs = _rounds_costs(sizes=(1,))
    policy = SpecPolicy(3, 16, costs, calibrate=False, lookups=True)
    step_s, lookup_s = 1.0, 0.1

    def due(steps: int) -> list[int]:
        out = []
        for s in range(steps):
            if policy.lookup_due(1, step_s):
                policy.observe_lookup(lookup_s)
                out.append(s)
        return out

    near = due(40)
    every = round(lookup_s / (P.LOOKUP_SHARE_NEAR * step_s))
    assert near[0] == 0 and all(b - a in (every, every + 1) for a, b in zip(near, near[1:]))
    for _ in range(400):
        policy.observe([3], [0], [3])  # proposals, all rejected, for long
    far = due(2000)
    assert policy.acceptance.rates[0] < 0.1
    assert len(far) == pytest.approx(2000 * P.LOOKUP_SHARE_FAR * step_s / lookup_s, abs=1.5)
    assert policy.num_lookups == len(near) + len(far) and policy.as_dict()["num_lookups"] == policy.num_lookups


def test_a_drafter_whose_plain_steps_are_looked_up_probes_from_probe_max():
    """lookups=True (n-gram): the plain steps' lookups show what a probe would, so probes start at
    PROBE_MAX and return there, not to PROBE_MIN, once speculation pays again."""
    policy = SpecPolicy(3, 16, _costs(), calibrate=False, lookups=True)
    ks = _drive(policy, 1000, lambda step: False)
    warm = P.WARMUP_TRIALS
    probes = [t for t in range(warm, len(ks)) if ks[t]]
    assert probes and probes[0] - warm == P.PROBE_MAX - 1 and policy.probe_interval == P.PROBE_MAX
    _drive(policy, 300, lambda step: True)
    assert policy.probe_interval == P.PROBE_MAX and policy.k_for_step(1) > 0


def test_a_fresh_policy_keeps_the_settings_and_drops_what_was_learned():
    """SpecPolicy.fresh (spec_bench's row per batch size): the costs, num_rounds, n-gram's lookups and
    the calibration as built, the estimates and counts new."""
    policy = SpecPolicy(3, 8, _rounds_costs(), calibrate=False, num_rounds=4, lookups=True)
    _drive(policy, 50, lambda step: 0)
    new = policy.fresh()
    assert (new.k_max, new.max_batch_size, new.costs, new.num_rounds) == (3, 8, policy.costs, 4)
    assert new.overheads is None and new.probe_interval == P.PROBE_MAX
    assert new.acceptance.num_observed == 0 and new.steps_by_k == [0] * 4
    assert SpecPolicy(3, 8, _costs()).fresh().overheads is not None
