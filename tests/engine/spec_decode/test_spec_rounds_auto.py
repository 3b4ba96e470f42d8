"""``num_speculative_tokens_per_batch_size: "auto"`` with ``num_rounds`` R (CPU, fp32, tiny models): the
policy (policy.py) chooses per step between a plain (multi-step) decode, a step of R device-resident
rounds at k_max (rounds.py, costed per round from the startup table's ``rounds``) and one round at a
smaller k. Where a test needs the choices to be deterministic it injects step costs (CPU timings of
tiny models say nothing about a GPU's) and leaves the calibration by measured step times off."""

from __future__ import annotations

import pytest
from test_spec_auto import on_injected_clock
from test_spec_engine import MAX_TOKENS, _greedy, _ids, _run, drafts, target  # noqa: F401 (fixtures)
from test_spec_rounds import _repeating_prompts
from tiny_models import looping_model_dir, prompts

from engine.llm import LLM
from engine.spec_decode import policy as P
from engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError
from engine.spec_decode.policy import SpecPolicy, StepCosts, choose_k

K = 3
R = 4
SIZES = [1, 2, 4, 8, 16]


def _ngram(min_n: int = 1) -> dict:
    return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": min_n, "prompt_lookup_max": 3,
            "num_rounds": R, "num_speculative_tokens_per_batch_size": "auto"}


def _costs(sizes=SIZES, round_s: float = 1.2, rounds_sizes: int | None = None) -> StepCosts:
    """A launch-bound GPU's shape: a plain token 1; one round through the host 3 + 0.05 k (its trip, a
    verify of k + 1 tokens), a lookup 0.01; a round of a rounds step ``round_s`` (a verify without the
    trip), for the first ``rounds_sizes`` sizes (all)."""
    n = len(sizes)
    return StepCosts(list(sizes), [1.0] * n, {k: [0.01] * n for k in range(1, K + 1)},
                     {k: [3.0 + 0.05 * k] * n for k in range(1, K + 1)}, catch_up=False, decode_one=[1.0] * n,
                     rounds=[round_s] * (n if rounds_sizes is None else rounds_sizes))


def test_the_policy_weighs_a_rounds_step_per_round():
    """k_max at a batch the rounds take costs a round of them (match or not); a smaller k, or a batch
    past the rounds' sizes, one round through the host; a rounds step's time calibrates its own kind."""
    costs = _costs(sizes=[1, 16], rounds_sizes=1)
    assert costs.in_rounds(1, K) and not costs.in_rounds(1, K - 1) and not costs.in_rounds(16, K)
    assert not costs.in_rounds(17, K)
    assert costs.step_seconds(1, K, p_any=0.1) == 1.2 and costs.step_seconds(1, 2) == pytest.approx(0.01 + 3.1)
    # Half accepted: R rounds (1.875 tokens per 1.2 s); rarely matched (5%): 1.04 per 1.2 s, and one
    # round at k 1 (1.025 tokens per 0.01 + 0.05 * 3.05 + 0.95 * 1.0 = 1.11 s) loses too: plain.
    assert choose_k([0.5] * K, costs, 1, K) == K
    assert choose_k([0.5] * K, costs, 1, K, match=0.05) == 0
    assert choose_k([0.5] * K, costs, 16, K) == 0  # past the rounds' sizes: rounds through the host lose
    policy = SpecPolicy(K, 16, costs)
    for _ in range(3):
        policy.observe_step(1, K, R * (1.2 + 0.3), steps=R)  # 0.3 a round over the table
    policy.observe_step(16, K, 99.0, steps=R)  # a size without rounds costs: not a rounds step
    assert policy.overheads.at(1) == pytest.approx((0.0, 0.0, 0.0, 0.3))
    assert policy.overheads.at(16) == (0.0, 0.0, 0.0, 0.0)
    assert policy.as_dict()["costs"]["rounds_s"] == [1.2]
    with pytest.raises(ValueError, match="rounds cost"):
        StepCosts([1], [1.0], {1: [1.0]}, {1: [1.0]}, rounds=[1.0, 1.0])


def test_config_takes_auto_with_rounds_and_the_engine_measures_them(target, drafts):
    """auto + num_rounds for n-gram and a draft model: the startup table holds a rounds step per round
    at every size the rounds take (their largest batch among them); the measurement's steps are not
    counted as the engine's. Medusa takes no num_rounds, auto or not: the key is named."""
    cfg = SpeculativeConfig.from_dict(_ngram())
    assert cfg.auto and cfg.num_rounds == R
    for spec in (_ngram(), {"model": drafts["exact"], "num_speculative_tokens": K, "num_rounds": R,
                            "num_speculative_tokens_per_batch_size": "auto", "max_batch_size": 6}):
        llm = LLM(target, device="cpu", block_size=4, speculative_config=spec)
        worker = llm.engine.spec_worker
        costs, rounds = worker.policy.costs, worker.rounds
        assert rounds.max_bs in costs.batch_sizes
        assert len(costs.rounds) == sum(b <= rounds.max_bs for b in costs.batch_sizes) >= 2
        assert all(t > 0 for t in costs.rounds) and rounds.num_steps == 0 and rounds.last_rounds == []
    with pytest.raises(SpeculativeConfigError, match=r"speculative_config\.num_rounds: unknown key"):
        SpeculativeConfig.from_dict({"method": "medusa", "model": "heads", "num_speculative_tokens": K,
                                     "num_rounds": R, "num_speculative_tokens_per_batch_size": "auto"})


def _auto_run(path: str, ps, params, spec: dict, costs: StepCosts, **kw):
    """The engine and its policy after generating, the output checked against plain decoding; each
    decode step asked the policy once (the scheduler asked twice where the step took no rounds, which
    advanced the probe count twice and ran probes as one round)."""
    base = [o.token_ids for o in LLM(path, device="cpu", **kw).generate(_ids(ps), params)]
    llm = LLM(path, device="cpu", speculative_config=spec, **kw)
    # As the worker builds it (its rounds, n-gram's lookups), on the injected costs.
    policy = on_injected_clock(llm, SpecPolicy(K, 16, costs, calibrate=False, num_rounds=R,
                                               lookups=spec.get("method") == "ngram"))
    schedule, decode_steps = llm.engine.scheduler.schedule, []

    def spy():
        batch = schedule()
        if batch is not None and not batch.is_prefill:
            decode_steps.append(len(batch.seqs))
        return batch

    llm.engine.scheduler.schedule = spy
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    assert sum(policy.steps_by_k) == len(decode_steps)
    return llm.engine, policy


def test_no_matches_decode_plainly_and_look_up(target):
    """Random prompts and a target that repeats nothing (n-gram of 2-3 tokens): after the warm-up's
    rounds the policy decodes plainly, its plain steps' lookups find nothing either, and an n-gram
    drafter's probes wait PROBE_MAX plain steps (the lookups stand in for them); greedy output equals
    plain decoding."""
    ps = prompts(2, seed=5, lo=4, hi=30)
    engine, policy = _auto_run(target, ps, _greedy(90), _ngram(min_n=2), _costs(), num_decode_steps=1)
    rounds = engine.spec_worker.rounds
    assert policy.probe_interval == P.PROBE_MAX and policy.steps_by_k[0] < P.PROBE_MAX
    assert policy.num_probes == 0 and rounds.num_steps == policy.steps_by_k[K]  # the warm-up: rounds
    assert policy.num_lookups >= 1 and policy.steps_by_k[0] > 3 * sum(policy.steps_by_k[1:])
    assert policy.steps_by_k[1:K] == [0] * (K - 1)  # one round through the host never pays here
    assert policy.acceptance.match < 0.5


@pytest.fixture(scope="module")
def looping_target(tmp_path_factory) -> str:
    return looping_model_dir(tmp_path_factory.mktemp("looping"))


def test_repetitive_text_drafts_in_rounds(looping_target):
    """Repetitive prompts on a model whose continuations cycle: the warm-up's rounds, at the prompts'
    start, match little (~0.3), which at a batch of 3 with no spread seen yet does not pay (a rounds
    step costed with the spread chance gives it: SpecPolicy.horizon); the plain steps' lookups then
    see the cycle, and from its first rounds step on the policy keeps taking steps of R rounds, whose
    proposals are accepted often, without probes."""
    ps = [p * 3 for p in prompts(3, seed=2, lo=4, hi=12)]
    ks: list[int] = []
    k_for_step = SpecPolicy.k_for_step
    SpecPolicy.k_for_step = lambda self, n: ks.append(k_for_step(self, n)) or ks[-1]
    try:
        engine, policy = _auto_run(looping_target, ps, _greedy(60), _ngram(), _costs())
    finally:
        SpecPolicy.k_for_step = k_for_step
    m, rounds = engine.spec_metrics, engine.spec_worker.rounds
    assert rounds.num_steps > 0 and m.acceptance_rate > 0.4 and m.mean_accepted_length > 1.5
    first = ks.index(K, 1)  # after the warm-up
    assert ks[first:] == [K] * (len(ks) - first) and len(ks) - first >= 3
    assert policy.num_lookups >= 1 and policy.num_probes == 0
    assert policy.acceptance.num_observed >= P.WARMUP_TRIALS


@pytest.mark.parametrize("drafter", ["ngram", "poor"])
def test_auto_rounds_greedy_output_equals_plain_decoding_in_a_ragged_batch(target, drafts, drafter):
    """A ragged batch (max_tokens 1..30) with auto + rounds: rounds in the warm-up and probes, plain
    steps between (injected costs), and with a draft model the engine's own measured table; the
    output equals plain decoding and both caches' blocks come back."""
    ps = _repeating_prompts(len(MAX_TOKENS), seed=21)
    params = [_greedy(m) for m in MAX_TOKENS]
    base, _ = _run(target, ps, params)
    if drafter == "ngram":
        engine, policy = _auto_run(target, ps, params, _ngram(), _costs(), block_size=4)
        assert policy.steps_by_k[0] > 0
    else:
        spec = {"model": drafts["poor"], "num_speculative_tokens": K, "num_rounds": R,
                "num_speculative_tokens_per_batch_size": "auto"}
        out, engine = _run(target, ps, params, spec, block_size=4)
        assert out == base
        assert all(s.draft_computed == 0 and not s.block_table for s in engine.seqs.values())
    assert engine.spec_worker.rounds.num_steps > 0
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks


def test_a_rounds_steps_wall_time_calibrates_its_own_kind(target):
    """SpecDecodeWorker.record_step: a step of R rounds adds its time per round beyond the table's
    round to the "rounds" overhead; a one-round step at k_max (a batch the rounds did not take) to
    the verify round's."""
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence

    llm = LLM(target, device="cpu", speculative_config=_ngram())
    worker = llm.engine.spec_worker
    policy = worker.policy = SpecPolicy(K, 16, _costs())  # calibrating
    seq = Sequence(list(range(3, 40)), _greedy(100))
    for _ in range(3):
        worker.record_step(ScheduledBatch([seq], False, [1], num_draft=[K], num_rounds=R), R * (1.2 + 0.3), [2 * R])
    assert policy.overheads.at(1) == pytest.approx((0.0, 0.0, 0.0, 0.3))
    worker.record_step(ScheduledBatch([seq], False, [1], num_draft=[K]), 0.01 + 3.15 + 0.5, [2])
    assert policy.overheads.at(1) == pytest.approx((0.0, 0.5, 0.0, 0.3))


def test_each_rounds_step_passes_its_tokens_per_sequence_to_the_policy(looping_target):
    """SpecDecodeWorker.step: after a step of R rounds the policy gets, for the sequences that ran every
    round, their engine ids and the tokens each round emitted (RowSpread, which costs a rounds step by
    its slowest sequence); the tokens are those the metrics counted."""
    ps = [p * 3 for p in prompts(3, seed=2, lo=4, hi=12)]
    calls = []
    orig = SpecPolicy.observe_rows

    def spy(self, ids, made):
        calls.append((list(ids), [list(m) for m in made]))
        orig(self, ids, made)

    SpecPolicy.observe_rows = spy
    try:
        engine, policy = _auto_run(looping_target, ps, _greedy(60), _ngram(), _costs())
    finally:
        SpecPolicy.observe_rows = orig
    rounds = engine.spec_worker.rounds
    assert rounds.num_steps > 0 and len(calls) == rounds.num_steps
    assert len({i for ids, _ in calls for i in ids}) <= len(ps)  # the same sequences' ids from step to step
    for ids, made in calls:
        assert len(ids) == len(made) and len(set(ids)) == len(ids)
        assert all(len(m) == len(made[0]) and 1 <= len(m) <= R and all(1 <= t <= K + 1 for t in m) for m in made)
    assert any(len(ids) >= 2 for ids, _ in calls)
    assert sum(sum(t for m in made for t in m) for _, made in calls) <= engine.spec_metrics.num_emitted
