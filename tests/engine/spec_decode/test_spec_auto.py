"""``num_speculative_tokens_per_batch_size: "auto"`` in the engine (CPU, fp32, tiny models): the step
costs measured at startup, a bad drafter turned off after warm-up with greedy output unchanged,
n-gram on a looping model kept on. Where a test needs the policy's choices to be deterministic it
injects step costs (CPU timings of tiny models say nothing about a GPU's) and leaves the
calibration by measured step times off."""

from __future__ import annotations

import faulthandler

import pytest
import torch
from tiny_models import looping_model_dir, prompts
from transformers import AutoConfig, AutoModelForCausalLM

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode import policy as P
from engine.spec_decode.policy import SpecPolicy, StepCosts

TARGET = "llama_gqa_untied"
K = 3
HANG_S = 240


@pytest.fixture(scope="module")
def target(model_dir) -> str:
    return model_dir(TARGET, with_tokenizer=True)


@pytest.fixture(scope="module")
def bad_draft(target, tmp_path_factory) -> str:
    """A random one-layer model of the target's vocabulary (and special tokens): its drafts are
    almost never the target's tokens."""
    config = AutoConfig.from_pretrained(target)
    config.num_hidden_layers = 1
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("bad_draft") / "m"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def looping_target(tmp_path_factory) -> str:
    return looping_model_dir(tmp_path_factory.mktemp("looping"))


def _ids(ps: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in ps]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def on_injected_clock(llm: LLM, policy: SpecPolicy) -> SpecPolicy:
    """``policy`` as the engine's, on its injected costs' clock as well: a plain step takes its table's
    seconds and an n-gram lookup its draft cost, not what this machine's load made of them.
    SpecPolicy.lookup_due spends a share of the plain steps' time on lookups, so measured times made the
    choices, and the tests, depend on the load (a CI run beside other work failed one so)."""
    worker = llm.engine.spec_worker
    worker.policy = policy
    record, observe_lookup = worker.record_step, policy.observe_lookup
    worker.record_step = lambda batch, seconds, num_new: record(
        batch, policy.costs.step_seconds(len(batch.seqs), 0) * batch.num_steps, num_new)
    policy.observe_lookup = lambda seconds: observe_lookup(policy.costs.draft[1][0])
    return policy


def _injected(sizes: list[int], draft: float, per_token: bool, decode_one: float = 1.0,
              verify: float = 1.0) -> StepCosts:
    """A memory-bound GPU's shape: a decode of 1 a token (``decode_one`` for a step of one token), a
    verify of k + 1 tokens of ``verify`` + 0.05 k; a draft of k tokens of k * ``draft``
    (``per_token``: a model's forwards) or ``draft`` (n-gram's lookup)."""
    n = len(sizes)
    return StepCosts(sizes, [1.0] * n, {k: [draft * (k if per_token else 1)] * n for k in range(1, K + 1)},
                     {k: [verify + 0.05 * k] * n for k in range(1, K + 1)}, catch_up=per_token,
                     decode_one=[decode_one] * n)


def test_startup_measures_every_batch_size_and_k(target, bad_draft):
    """The engine times plain decode, a draft forward and a verify of k + 1 tokens for k = 1..k_max at
    each batch size up to max_batch_size, and shows the table (and the chosen k) in its stats."""
    spec = {"model": bad_draft, "num_speculative_tokens": K, "num_speculative_tokens_per_batch_size": "auto",
            "max_batch_size": 6}
    llm = LLM(target, device="cpu", speculative_config=spec)
    costs = llm.engine.spec_worker.policy.costs
    assert costs.batch_sizes == [1, 2, 4, 6] and sorted(costs.verify) == sorted(costs.draft) == [1, 2, 3]
    assert costs.catch_up
    assert all(t > 0 for t in costs.decode + [t for d in (costs.draft, costs.verify) for v in d.values() for t in v])
    assert 0 < costs.measure_s < 60
    assert len(costs.decode_one) == 4 and all(t > 0 for t in costs.decode_one)  # a one-token plain step
    llm.generate(_ids(prompts(2, seed=1, lo=3, hi=10)), _greedy(5))
    assert llm.engine.spec_worker.policy.costs is costs  # measured once, at startup, not in a request
    stats = llm.engine.stats()["spec_decode"]["policy"]
    assert stats["costs"]["batch_sizes"] == [1, 2, 4, 6] and sum(stats["steps_by_k"]) > 0
    assert len(stats["acceptance_estimate"]) == K
    # Without "auto" nothing is measured and the scheduler takes k as configured.
    fixed = LLM(target, device="cpu", speculative_config={"model": bad_draft, "num_speculative_tokens": K})
    assert fixed.engine.spec_worker.policy is None and "policy" not in fixed.engine.stats()["spec_decode"]
    assert fixed.engine.scheduler.spec_k(3) == K


def test_a_bad_draft_model_stops_speculating_after_warm_up(target, bad_draft):
    """Greedy tokens equal plain decoding's; after the warm-up the policy speculates only in its probes."""
    ps = prompts(2, seed=5, lo=4, hi=30)
    params = _greedy(90)
    base = [o.token_ids for o in LLM(target, device="cpu", num_decode_steps=1).generate(_ids(ps), params)]
    spec = {"model": bad_draft, "num_speculative_tokens": K, "num_speculative_tokens_per_batch_size": "auto"}
    llm = LLM(target, device="cpu", num_decode_steps=1, speculative_config=spec)
    engine = llm.engine
    # A draft forward at a fifth of the target's: a drafter that always agreed would give 2x; this
    # one would need to be accepted over a third of the time at position 0 to pay at all.
    policy = engine.spec_worker.policy = SpecPolicy(K, 16, _injected([1, 2, 4, 8, 16], 0.2, True), calibrate=False)
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    warm_steps = P.WARMUP_TRIALS // len(ps)  # each step observes both sequences
    assert policy.num_probes >= 1
    assert engine.num_spec_steps == warm_steps + policy.num_probes
    assert policy.steps_by_k[K] == engine.num_spec_steps and policy.steps_by_k[0] > 3 * engine.num_spec_steps
    assert policy.acceptance.rates[0] < 0.2 and engine.spec_metrics.acceptance_rate < 0.1


def test_ngram_on_a_looping_model_keeps_speculating(looping_target):
    """Repetitive prompts (a phrase three times) on a model whose continuations cycle: n-gram drafts
    are accepted often, so the policy speculates at every step."""
    ps = [p * 3 for p in prompts(3, seed=2, lo=4, hi=12)]
    params = _greedy(60)
    base = [o.token_ids for o in LLM(looping_target, device="cpu").generate(_ids(ps), params)]
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "num_speculative_tokens_per_batch_size": "auto"}
    llm = LLM(looping_target, device="cpu", speculative_config=spec)
    policy = on_injected_clock(llm, SpecPolicy(K, 16, _injected([1, 2, 4, 8, 16], 0.01, False), calibrate=False))
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    m = llm.engine.spec_metrics
    assert m.acceptance_rate > 0.5 and m.mean_accepted_length > 1.5
    decode_steps = sum(policy.steps_by_k)
    assert policy.steps_by_k[0] <= decode_steps // 10 and policy.num_probes == 0


def test_each_one_round_step_passes_its_tokens_per_sequence_to_the_policy(looping_target):
    """SpecDecodeWorker._record: after a one-round speculative step (num_rounds 1, the default) the
    policy gets each asked sequence's engine id and the tokens it emitted, accepted + 1 (1 for a
    sequence without a match), which RowSpread compares from step to step: a fixed batch waits for
    its slowest sequence. The tokens are those the metrics counted (a round asked for no drafts is
    left out)."""
    ps = [p * 3 for p in prompts(3, seed=2, lo=4, hi=12)]
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "num_speculative_tokens_per_batch_size": "auto"}
    llm = LLM(looping_target, device="cpu", speculative_config=spec)
    policy = on_injected_clock(llm, SpecPolicy(K, 16, _injected([1, 2, 4, 8, 16], 0.01, False), calibrate=False))
    calls = []
    orig = policy.observe_tokens

    def spy(ids, made):
        calls.append((list(ids), list(made)))
        orig(ids, made)

    policy.observe_tokens = spy
    llm.generate(_ids(ps), _greedy(60))
    assert len(calls) == llm.engine.num_spec_steps > 10  # one per speculative step
    assert len({i for ids, _ in calls for i in ids}) == len(ps)  # the same sequences' ids from step to step
    assert all(len(ids) == len(made) == len(set(ids)) and all(1 <= t <= K + 1 for t in made) for ids, made in calls)
    assert any(len(ids) == 3 for ids, _ in calls)
    # All the metrics counted but a sequence's last round, which its max_tokens left no draft (not asked).
    assert 0 <= llm.engine.spec_metrics.num_emitted - sum(sum(made) for _, made in calls) <= len(ps)
    assert policy.spread.recent.keys() <= set(calls[-1][0])  # finished sequences are dropped


# A prompt whose greedy continuation on the looping model repeats nothing for its first 15 tokens
# (an n-gram lookup of 2-3 tokens finds no match), then falls into cycles that the lookup predicts.
UNMATCHED_START = dict(n=6, seed=11, lo=8, hi=20)
NGRAM_2_3 = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 3,
             "num_speculative_tokens_per_batch_size": "auto"}


def _unmatched_start(looping_target: str, costs: StepCosts) -> tuple[LLM, SpecPolicy, list[int]]:
    ps = prompts(**UNMATCHED_START)[:1]
    params = _greedy(60)
    base = [o.token_ids for o in LLM(looping_target, device="cpu").generate(_ids(ps), params)]
    llm = LLM(looping_target, device="cpu", speculative_config=NGRAM_2_3)
    policy = on_injected_clock(llm, SpecPolicy(K, 16, costs, calibrate=False))
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    return llm, policy, out[0]


def test_ngram_rounds_without_a_match_do_not_turn_speculation_off(looping_target):
    """The warm-up's rounds find no match (the continuation repeats nothing yet): they were counted
    as rejections at position 0, so the policy decoded the rest plainly although every match later
    is accepted. With the H200's batch-1 shape (a verify of two decodes) a round without a match
    costs a lookup and a plain step, a small loss against what a match gives, so k stays K."""
    llm, policy, _ = _unmatched_start(looping_target, _injected([1, 2, 4, 8, 16], 0.01, False, verify=2.0))
    m = llm.engine.spec_metrics
    unmatched = m.num_emitted - m.num_drafts - m.num_accepted  # rounds that emitted the target's token alone
    assert unmatched >= 10 and m.num_drafts >= 5 and m.acceptance_rate > 0.5
    assert policy.steps_by_k[0] == 0 and policy.steps_by_k[K] == sum(policy.steps_by_k)
    assert policy.acceptance.match < 0.8 and policy.acceptance.rates[0] > 0.6


def test_plain_steps_observe_the_ngram_rounds_they_replace(looping_target):
    """Where a round without a match costs one and a half tokens of plain decoding, a run of them turns the
    policy to plain decoding; the lookups it then checks against each plain step's tokens see the
    cycles start, and it speculates again before any probe would have."""
    llm, policy, _ = _unmatched_start(looping_target, _injected([1, 2, 4, 8, 16], 0.01, False, decode_one=1.5))
    assert policy.steps_by_k[0] >= 1 and policy.num_probes == 0
    warm = P.WARMUP_TRIALS
    assert policy.steps_by_k[K] > warm and llm.engine.spec_metrics.num_drafts >= 3
    assert policy.acceptance.rates[0] > 0.6


def test_two_ranks_measure_and_run_the_auto_policy(target, bad_draft):
    """Under tensor parallelism the startup timing runs every target forward on both ranks (a
    VerifyStep each), the draft's on rank 0 alone (a draft forward inside the ranks' group waited
    forever for rank 1); greedy tokens equal one rank's without speculation."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang fails the run, with its traceback
    try:
        _two_ranks(target, bad_draft)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _two_ranks(target: str, bad_draft: str) -> None:
    ps = prompts(3, seed=7, lo=4, hi=30)
    params = _greedy(20)
    kw = dict(device="cpu", dtype="float32", max_model_len=160, num_kv_blocks=96)
    base = [o.token_ids for o in LLM(target, **kw).generate(_ids(ps), params)]
    spec = {"model": bad_draft, "num_speculative_tokens": K, "num_speculative_tokens_per_batch_size": "auto",
            "max_batch_size": 4}
    llm = LLM(target, tensor_parallel_size=2, speculative_config=spec, **kw)
    try:
        costs = llm.engine.spec_worker.policy.costs
        assert costs.batch_sizes == [1, 2, 4] and all(t > 0 for t in costs.decode + costs.verify[K] + costs.draft[K])
        out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    finally:
        llm.close()
    assert out == base and llm.engine.num_spec_steps > 0


def test_plain_steps_look_up_ngram_rounds_when_the_policy_says_and_time_them(target):
    """After each plain step (not a speculative one) the worker asks SpecPolicy.lookup_due with the
    step's seconds whether one row's n-gram round is observed (a lookup between two steps leaves the
    GPU idle: the fourteenth session's n-gram engine with drafting off ran 0.96x the plain one), and
    gives each lookup's measured host time to observe_lookup, which the next ones are weighed by."""
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence

    llm = LLM(target, device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": K,
                                                        "num_speculative_tokens_per_batch_size": "auto"})
    worker = llm.engine.spec_worker
    policy = worker.policy
    assert policy.probe_interval == P.PROBE_MAX  # n-gram: the lookups stand in for probes
    observed: list[int] = []
    asked: list[tuple[int, float]] = []
    unrun_round = worker._unrun_round
    worker._unrun_round = lambda seqs, num_new: observed.append(step) or True
    policy.lookup_due = lambda n, seconds: asked.append((n, seconds)) or step % 3 == 0
    seq = Sequence(list(range(3, 40)), _greedy(100))
    plain = ScheduledBatch([seq], False, [1], num_steps=8)
    spec = ScheduledBatch([seq], False, [1], num_draft=[K])
    for step in range(1, 10):
        worker.record_step(plain, 0.01, [8])
    worker.record_step(spec, 0.01, [2])
    assert asked == [(1, 0.01)] * 9 and observed == [3, 6, 9] and policy.num_lookups == 3
    # The real lookup: a row that made no token is skipped and not timed; one that made 8 is.
    worker._unrun_round, step = unrun_round, 3
    worker.record_step(plain, 0.01, [0])
    assert policy.num_lookups == 3
    seq.token_ids.extend(range(3, 11))  # the plain step's 8 tokens, a repeat of the prompt's start
    worker.record_step(plain, 0.01, [8])
    assert policy.num_lookups == 4 and policy.lookup_s > 0.0
    assert policy.acceptance.num_observed == 1  # the warm-up has not run: only this lookup observed
