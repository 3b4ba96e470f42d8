"""experiments/spec_policy_sim.py: the CPU replay of the auto k policy on a described workload (what
a spec_bench speed row would give). Its numbers are a model's arithmetic, seeded, no timing: these
check that the replay follows the worker and keep the findings it was built for."""

from __future__ import annotations

import pytest

from engine.spec_decode import policy as P
from engine.spec_decode import worker as W
from experiments import spec_policy_sim as S


def test_the_replay_follows_the_workers_lookup_schedule_and_the_h200_table():
    assert (S.UNRUN_EAGER, S.UNRUN_EVERY) == (W.UNRUN_EAGER, W.UNRUN_EVERY)
    assert S.H200_COSTS.k_max == 4 and len(S.H200_OVERHEAD) == len(S.H200_COSTS.batch_sizes)
    assert [S.GSM8K.row_match(q) for q in (0, 15)] == pytest.approx([0.175, 0.525])


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
    """The findings: on gsm8k-like rows the policy's learning (warm-up, probes, its estimate's swings)
    costs ~1% of a run (plain steps' lookups included); at batch 16 with rounds even choices on the
    true rates lose ~7% when a rounds step is costed by the mean sequence (the batch waits for its
    slowest, the steps after carry few rows), and the slowest's cost (RowSpread) keeps the policy near
    plain decoding there; wikitext-like rows keep their rounds."""
    for n in (1, 4):
        for rounds in (1, 8):
            r = S.report(P, S.GSM8K, n, rounds, 2)
            assert r["mean"] > 0.97
            assert r["lost"].get("warmup", 0) + r["lost"].get("probe", 0) < 0.01
    mean_oracle = S.report("oracle", S.GSM8K, 16, 8, 2)["mean"]
    assert mean_oracle < 0.95 and S.report("oracle-slowest", S.GSM8K, 16, 8, 2)["mean"] > 0.98
    assert S.report(P, S.GSM8K, 16, 8, 2)["mean"] > mean_oracle + 0.02
    assert all(S.report(P, S.WIKITEXT, n, 8, 2)["mean"] > 1.4 for n in (1, 4, 16))
