"""experiments/spec_policy_sim.py: the CPU replay of the auto k policy on a described workload (what
a spec_bench speed row would give). Its numbers are a model's arithmetic, seeded, no timing: these
check that the replay follows the worker and keep the findings it was built for."""

from __future__ import annotations

import pytest

from engine.spec_decode import policy as P
from engine.spec_decode import worker as W
from experiments import spec_policy_sim as S


def test_the_replay_follows_the_workers_lookups_and_the_h200_table():
    """The worker has no lookup schedule of its own (the policy's lookup_due decides); the replay asks
    it after each plain step as the worker does, gives it the lookup's time, and reports the lookups'
    seconds as their own kind of step."""
    assert not hasattr(W, "UNRUN_EAGER") and not hasattr(W, "UNRUN_EVERY")
    assert S.H200_COSTS.k_max == 4 and len(S.H200_OVERHEAD) == len(S.H200_COSTS.batch_sizes)
    assert [S.GSM8K.row_match(q) for q in (0, 15)] == pytest.approx([0.175, 0.525])
    policy = P.SpecPolicy(4, 16, S.H200_COSTS, num_rounds=8, lookups=True)
    sim = S.Sim(policy, S.GSM8K, 8, seed=1)
    sim.generate([0, 1, 2, 3], 256)
    sec, tokens, count = sim.by_reason["lookup"]
    assert count == policy.num_lookups >= 1 and tokens == 0 and sec == pytest.approx(count * S.LOOKUP_S)
    assert policy.lookup_s == S.LOOKUP_S and policy.num_rounds == 8


def test_streaks_run_in_the_text_not_in_the_lookups():
    """Workload.streak: a lookup one round after a matching one matches with rate + streak (1 - rate);
    one many rounds later (a plain step's tokens passed, or other rows were looked at) with the rate."""
    work = S.Workload("t", 0.3, [0.5] * 4, streak=0.6)
    sim = S.Sim(None, work, 1, seed=3)
    sim.last, sim.per_round, sim.since = [True], [2.0], [0.0]

    def share(gap_tokens: float) -> float:
        hits = 0
        for _ in range(20000):
            sim.last[0], sim.since[0] = True, gap_tokens
            hits += sim._match(0, 0.3)
        return hits / 20000

    assert share(2.0) == pytest.approx(0.3 + 0.6 * 0.7, abs=0.015)  # one round (2 tokens) later
    assert share(200.0) == pytest.approx(0.3, abs=0.015)


def test_fixed_k_replays_near_the_h200_rows():
    """Fixed k = 4 (a policy that always says 4) against the H200's rows: gsm8k one round 0.885x /
    0.79x / 0.57x at batch 1 / 4 / 16, rounds 0.84x-0.86x; wikitext rounds 1.54x-1.61x."""

    class Fixed:
        k_max, num_probes, last_reason = 4, 0, "fixed"
        acceptance = P.AcceptanceEstimate(4)

        def __init__(self, *args, **kw):
            pass

        def k_for_step(self, n):
            return 4

        def observe(self, *args):
            pass

        def observe_step(self, *args, **kw):
            pass

    class Mod:
        SpecPolicy = Fixed

    one = [S.report(Mod, S.GSM8K, n, 1, 2)["mean"] for n in (1, 4, 16)]
    assert one[0] > one[1] > one[2] and 0.8 < one[0] < 0.95 and one[2] < 0.65
    assert all(0.8 < S.report(Mod, S.GSM8K, n, 8, 2)["mean"] < 0.95 for n in (1, 16))
    assert all(S.report(Mod, S.WIKITEXT, n, 8, 2)["mean"] > 1.4 for n in (1, 16))


def test_auto_on_gsm8k_learns_cheaply_and_rounds_wait_for_the_slowest_sequence():
    """The findings: on gsm8k-like rows the policy's learning (warm-up, probes, lookups, its estimate's
    swings) costs under 1% of a run at every batch size, rounds or not, streaks or not (the replay at
    20 seeds: 0.994-0.999); at batch 16 with rounds even choices on the true rates lose ~7% when a
    rounds step is costed by the mean sequence (the batch waits for its slowest, the steps after carry
    few rows), and the slowest's cost (RowSpread, and chance's until it has evidence) keeps the policy
    plain there; wikitext-like rows keep their rounds."""
    for work in (S.GSM8K, S.GSM8K_STREAKS):
        for n in (1, 4, 16):
            for rounds in (1, 8):
                r = S.report(P, work, n, rounds, 2)
                assert r["mean"] > 0.99
                assert sum(r["lost"].get(kind, 0) for kind in ("warmup", "probe", "lookup")) < 0.005
    mean_oracle = S.report("oracle", S.GSM8K, 16, 8, 2)["mean"]
    assert mean_oracle < 0.95 and S.report("oracle-slowest", S.GSM8K, 16, 8, 2)["mean"] > 0.98
    assert S.report(P, S.GSM8K, 16, 8, 2)["mean"] > mean_oracle + 0.02
    assert all(S.report(P, S.WIKITEXT, n, 8, 2)["mean"] > 1.4 for n in (1, 4, 16))


def test_one_round_steps_at_16_wait_for_the_slowest_sequence_too():
    """num_rounds 1 (the engine's default): wikitext-like rows at batch 16 lose with one-round steps
    costed by the mean sequence even on the true rates (oracle ~0.96x, streaks ~0.92x), not with the
    slowest's (1.0x); the replay gives the policy each one-round step's tokens per sequence as the
    worker does (RowSpread.observe_round), and it stays near plain there (20 seeds: 0.979x / 0.968x,
    0.946x / 0.952x before) while batches of 4, whose sequences differ little, keep their gain."""
    policy = P.SpecPolicy(4, 16, S.H200_COSTS, num_rounds=1, lookups=True)
    seen = []
    policy.observe_tokens = lambda ids, made: seen.append((list(ids), list(made)))
    S.Sim(policy, S.WIKITEXT, 1, seed=2).generate(list(range(16)), 64)
    assert seen and all(len(ids) == len(made) and all(1 <= t <= 5 for t in made) for ids, made in seen)
    assert S.report("oracle", S.WIKITEXT, 16, 1, 2)["mean"] < 0.97
    assert S.report("oracle-slowest", S.WIKITEXT, 16, 1, 2)["mean"] > 0.99
    for work, before in ((S.WIKITEXT, 0.96), (S.WIKITEXT_STREAKS, 0.933)):  # these 2 seeds' before
        assert S.report(P, work, 16, 1, 2)["mean"] > before + 0.01
        assert S.report(P, work, 4, 1, 2)["mean"] > 1.3
