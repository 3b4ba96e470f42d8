"""Device-resident greedy speculative rounds (speculative_config num_rounds, engine/spec_decode/
rounds.py) on the CPU, eagerly through the torch references: greedy output equals plain decoding
and one-round speculation, in a ragged batch with a drafter that often disagrees, with stops and
limits landing inside a round, under preemption, beside rows that take the one-round path; both
caches' blocks all come back."""

from __future__ import annotations

import pytest
from drafts import assert_stops_inside_accepted_runs
from support import widen_m1_gemv_programs
from test_spec_engine import MAX_TOKENS, TARGET, _greedy, _ids, _run, drafts, target  # noqa: F401 (fixtures)
from tiny_models import prompts

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfigError



def _spec(path: str, rounds: int, k: int = 3) -> dict:
    return {"model": path, "num_speculative_tokens": k, "num_rounds": rounds}


def _pool_full(engine) -> bool:
    return engine.block_manager.num_free_blocks == engine.runner.num_blocks


def test_greedy_rounds_equal_plain_decoding_in_a_ragged_batch(target, drafts):
    ps = prompts(len(MAX_TOKENS), seed=3, lo=2, hi=40)
    params = [_greedy(m) for m in MAX_TOKENS]
    base, _ = _run(target, ps, params)
    one, _ = _run(target, ps, params, _spec(drafts["poor"], 1))
    assert one == base
    for rounds in (2, 4):
        out, engine = _run(target, ps, params, _spec(drafts["poor"], rounds), block_size=4)
        assert out == base, rounds
        assert engine.spec_worker.rounds.num_steps > 0
        m = engine.spec_metrics
        assert 0.1 < m.acceptance_rate < 0.9  # a drafter that often disagrees, and sometimes agrees
        assert m.num_accepted == sum(m.accepted_per_position)
        assert _pool_full(engine)
        assert all(s.draft_computed == 0 and not s.block_table for s in engine.seqs.values())


def test_stop_token_stop_string_and_max_tokens_inside_a_round(target, drafts):
    """With a drafter equal to the target every draft is accepted: a round emits k + 1 tokens, and
    the stops land inside rounds, with rounds after them in the same step."""
    ps = prompts(4, seed=5, lo=4, hi=20)
    base, _ = _run(target, ps, [_greedy(30)] * 4)
    llm = LLM(target, device="cpu", block_size=4, speculative_config=_spec(drafts["exact"], 4, k=3))
    assert_stops_inside_accepted_runs(llm, base, _ids(ps), 30, cut=9)
    engine = llm.engine
    m = engine.spec_metrics
    assert engine.spec_worker.rounds.num_steps > 0 and m.acceptance_rate == 1.0
    assert m.mean_accepted_length == 4.0  # every round of every draft: k accepted + the target's own
    assert _pool_full(engine)


def test_rounds_under_preemption_and_beside_sampling_rows(target, drafts):
    """A pool too small for every sequence: some steps cannot reserve R (k + 1) positions and take
    one round, preemption recomputes; a batch with a sampling row takes the one-round path."""
    ps = prompts(6, seed=7, lo=20, hi=40)
    params = [_greedy(m) for m in (30, 25, 28, 20, 31, 26)]
    kw = dict(block_size=4, num_kv_blocks=40, max_model_len=128)
    base, _ = _run(target, ps, params, **kw)
    out, engine = _run(target, ps, params, _spec(drafts["poor"], 4), **kw)
    assert engine.scheduler.num_preemptions > 0 and engine.spec_worker.rounds.num_steps > 0
    assert out == base
    assert engine.block_manager.num_free_blocks == 40
    mixed = params[:3] + [SamplingParams(temperature=0.8, max_tokens=20, seed=3)]
    one, _ = _run(target, ps[:4], mixed, _spec(drafts["poor"], 1))
    out, engine = _run(target, ps[:4], mixed, _spec(drafts["poor"], 4))
    assert out == one  # the sampling row's draws are the one-round path's: seeded, same steps
    assert engine.spec_worker.rounds.num_steps > 0  # once the sampling row finished
    assert _pool_full(engine)


def test_scheduler_reserves_rounds_and_stays_below_max_model_len(target, drafts):
    """A step of R rounds reserves R (k + 1) positions per sequence; near max_model_len R shrinks,
    and where two rounds no longer fit the step takes one round; the outputs equal plain decoding."""
    ps = prompts(2, seed=9, lo=20, hi=22)
    params = [_greedy(60), _greedy(60)]
    kw = dict(block_size=4, max_model_len=48)
    base, _ = _run(target, ps, params, **kw)
    llm = LLM(target, device="cpu", speculative_config=_spec(drafts["exact"], 4, k=3), **kw)
    engine = llm.engine
    seen: list[tuple[int, list[int], list[int]]] = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        if batch is not None and not batch.is_prefill:
            seen.append((batch.num_rounds, [len(s) for s in batch.seqs], [len(s.block_table) for s in batch.seqs]))
        return batch

    engine.scheduler.schedule = spy
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    rounds = [r for r, _, _ in seen]
    assert 4 in rounds and 1 in rounds  # R shrinks, then one round, near max_model_len
    for r, lens, blocks in seen:
        if r > 1:
            assert all(n + r * 4 <= 48 for n in lens)
            assert all(b * 4 >= n - 1 + r * 4 for n, b in zip(lens, blocks))
    assert _pool_full(engine)


@pytest.mark.parametrize("raw", [{"num_rounds": 0}, {"num_rounds": "2"}, {"num_rounds": 2.0}])
def test_num_rounds_config_errors(target, drafts, raw):
    with pytest.raises(SpeculativeConfigError, match="speculative_config.num_rounds"):
        LLM(target, device="cpu", speculative_config={"model": drafts["poor"], "num_speculative_tokens": 3, **raw})


@pytest.mark.parametrize("raw", [{"num_rounds": 0}, {"num_rounds": "2"}, {"num_rounds": 2.0}])
def test_ngram_num_rounds_config_errors(target, raw):
    with pytest.raises(SpeculativeConfigError, match="speculative_config.num_rounds"):
        LLM(target, device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": 3, **raw})


def _ngram(rounds: int, k: int = 3) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "num_rounds": rounds}


def _repeating_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase (prompt lookup finds matches) with a random tail."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 250) for _ in range(rng.randrange(2, 6))]
        out.append(phrase * rng.randrange(2, 5) + [rng.randrange(3, 250) for _ in range(rng.randrange(0, 4))])
    return out


def test_ngram_rounds_equal_plain_decoding_in_a_ragged_batch(target):
    """n-gram drafts looked up on the device (kernels/ngram_match.py) in a history the rounds extend themselves:
    the output equals plain decoding and one-round n-gram speculation; drafts are accepted and rejected."""
    ps = _repeating_prompts(len(MAX_TOKENS), seed=34)
    params = [_greedy(m) for m in MAX_TOKENS]
    base, _ = _run(target, ps, params)
    one, _ = _run(target, ps, params, _ngram(1))
    assert one == base
    for rounds in (2, 4):
        llm = LLM(target, device="cpu", block_size=4, speculative_config=_ngram(rounds))
        runner = llm.engine.spec_worker.rounds
        step, checked = runner.step, []

        def spy(batch, metrics):  # after a step the history holds each context and every emitted token
            before = [list(s.token_ids) for s in batch.seqs]
            result = step(batch, metrics)
            for i, (ctx, new) in enumerate(zip(before, result.tokens)):
                assert runner.drafter.hist[i, : len(ctx) + len(new)].tolist() == ctx + new
            checked.append(len(batch.seqs))
            return result

        runner.step = spy
        out = [o.token_ids for o in llm.generate(_ids(ps), params)]
        assert out == base, rounds
        assert checked and runner.num_steps == len(checked)
        m = llm.engine.spec_metrics
        assert 0.0 < m.acceptance_rate < 1.0
        assert _pool_full(llm.engine)


def test_ngram_rounds_under_preemption_and_up_to_max_model_len(target):
    """A pool too small for every sequence (steps that cannot reserve R (k + 1) positions take one
    round, preemption recomputes and re-uploads the history), and contexts that run into max_model_len
    (the history's last columns, R shrinking to one round): the output equals plain decoding."""
    ps = _repeating_prompts(6, seed=23)
    params = [_greedy(m) for m in (30, 25, 28, 20, 31, 26)]
    kw = dict(block_size=4, num_kv_blocks=30, max_model_len=64)
    base, _ = _run(target, ps, params, **kw)
    out, engine = _run(target, ps, params, _ngram(4), **kw)
    assert engine.scheduler.num_preemptions > 0 and engine.spec_worker.rounds.num_steps > 0
    assert out == base
    assert engine.block_manager.num_free_blocks == 30
    long = [(p * 20)[:40] for p in _repeating_prompts(2, seed=24)]
    params = [_greedy(64 - 40), _greedy(64 - 41)]  # to the last position max_model_len allows
    base, _ = _run(target, long, params, block_size=4, max_model_len=64)
    out, engine = _run(target, long, params, _ngram(4), block_size=4, max_model_len=64)
    assert out == base and engine.spec_worker.rounds.num_steps > 0
    assert _pool_full(engine)


def test_ngram_rounds_with_stops_padding_rows_and_the_triton_kernels(target, monkeypatch):
    """A stop token and max_tokens inside rounds; a batch in its bucket's rows (padding rows look up
    garbage and write nothing); then the Triton spec_advance (interpreted on the CPU), eager."""
    widen_m1_gemv_programs(monkeypatch)  # fewer interpreted GEMV programs, the same kernels and sums
    ps = _repeating_prompts(6, seed=22)
    params = [_greedy(m) for m in (19, 7, 26, 3, 14, 22)]
    base, _ = _run(target, ps, params, block_size=4)
    stop = base[2][5]  # a token the third sequence makes: its run stops there
    stopped = params[:2] + [_greedy(26, stop_token_ids=[stop])] + params[3:]
    base_stop, _ = _run(target, ps, stopped, block_size=4)
    assert len(base_stop[2]) < len(base[2])
    llm = LLM(target, device="cpu", block_size=4, speculative_config=_ngram(3))
    rounds = llm.engine.spec_worker.rounds
    rounds.graphs = {b: _Replay(rounds, b) for b in rounds.buckets}
    assert [o.token_ids for o in llm.generate(_ids(ps), stopped)] == base_stop
    assert rounds.num_steps > 0 and _pool_full(llm.engine)
    kw = dict(use_triton=True, enforce_eager=True, dtype="float32", block_size=4, max_model_len=64)
    short = [_greedy(m) for m in (9, 4, 7)]  # the interpreter is slow: a few rounds suffice
    base_t, _ = _run(target, ps[:3], short, **kw)
    out, engine = _run(target, ps[:3], short, _ngram(3, k=2), **kw)
    assert out == base_t and engine.spec_worker.rounds.num_steps > 0
    assert _pool_full(engine)


def test_rounds_through_the_triton_kernels(target, drafts, monkeypatch):
    """The engine's Triton kernels on (interpreted on the CPU: TRITON_INTERPRET=1), eager: the round's
    greedy_advance and spec_advance launches, the decode attention over pseudo-rows and lag rows."""
    widen_m1_gemv_programs(monkeypatch)  # fewer interpreted GEMV programs, the same kernels and sums
    ps = prompts(3, seed=11, lo=3, hi=20)
    params = [_greedy(m) for m in (9, 4, 7)]
    kw = dict(use_triton=True, enforce_eager=True, dtype="float32", block_size=4, max_model_len=64)
    base, _ = _run(target, ps, params, **kw)
    out, engine = _run(target, ps, params, _spec(drafts["poor"], 3, k=2), **kw)
    assert out == base
    assert engine.spec_worker.rounds.num_steps > 0 and engine.runner.decode_inputs.use_triton
    assert _pool_full(engine)


class _Replay:
    """A stand-in for a captured round's CUDA graph: replay runs the round's body for its bucket."""

    def __init__(self, rounds, bucket: int) -> None:
        self.rounds, self.bucket = rounds, bucket

    def replay(self) -> None:
        self.rounds._round(self.bucket)


def test_bucketed_rounds_with_padding_rows(target, drafts):
    """The graphed path's layout on the CPU: a batch runs in its bucket's rows (padding sequences
    and padding drafter rows between the newest-token rows and the lag rows), each replay one round."""
    ps = prompts(6, seed=12, lo=2, hi=30)
    params = [_greedy(m) for m in (19, 7, 26, 3, 14, 22)]
    base, _ = _run(target, ps, params, block_size=4)
    llm = LLM(target, device="cpu", block_size=4, speculative_config=_spec(drafts["poor"], 3))
    rounds = llm.engine.spec_worker.rounds
    assert not rounds.graphs and rounds.buckets == [1, 2, 4, 8, 16]
    rounds.graphs = {b: _Replay(rounds, b) for b in rounds.buckets}
    sizes = []
    step = rounds.step

    def spy(batch, metrics):
        sizes.append(len(batch.seqs))
        return step(batch, metrics)

    rounds.step = spy
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    assert any(n not in rounds.buckets for n in sizes)  # padded: 6, 5 or 3 sequences in 8 or 4 rows
    assert _pool_full(llm.engine)


def test_a_per_batch_size_k_other_than_the_rounds_k_takes_one_round(target, drafts):
    """Rounds are built for num_speculative_tokens; a batch size whose table k differs (here batch 1:
    k 2) speculates one round a step; the others take rounds."""
    ps = prompts(3, seed=13, lo=3, hi=25)
    params = [_greedy(m) for m in (6, 9, 40)]  # the last runs alone at the end
    base, _ = _run(target, ps, params)
    spec = {**_spec(drafts["poor"], 4), "num_speculative_tokens_per_batch_size": {1: 2, 16: 3}}
    llm = LLM(target, device="cpu", speculative_config=spec)
    batches = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        batch = schedule()
        if batch is not None and batch.num_draft is not None:
            batches.append((len(batch.seqs), batch.num_rounds, batch.num_draft[0]))
        return batch

    llm.engine.scheduler.schedule = spy
    assert [o.token_ids for o in llm.generate(_ids(ps), params)] == base
    alone = [(r, k) for n, r, k in batches if n == 1]  # k 2, or less near max_tokens (draft_limit)
    assert (1, 2) in alone and all(r == 1 and k <= 2 for r, k in alone)
    assert all(r > 1 and k == 3 for n, r, k in batches if n > 1) and any(n > 1 for n, _, _ in batches)
    assert _pool_full(llm.engine)


def test_rounds_too_wide_for_the_decode_rows_take_one_round(target, drafts):
    """k + 1 verify rows past the target's decode rows (k 20 with max_num_seqs 4: 16 rows): no batch
    takes rounds, every step speculates one round."""
    ps = prompts(2, seed=14, lo=3, hi=20)
    params = [_greedy(30), _greedy(25)]
    base, _ = _run(target, ps, params, max_num_seqs=4)
    out, engine = _run(target, ps, params, _spec(drafts["poor"], 4, k=20), max_num_seqs=4)
    assert out == base
    rounds = engine.spec_worker.rounds
    assert rounds.buckets == [] and rounds.num_steps == 0 and engine.num_spec_steps > 0


def _request(ps: list[list[int]], seq) -> int:
    """The index of the prompt ``seq`` began with."""
    return next(i for i, p in enumerate(ps) if seq.token_ids[: len(p)] == p)


def _round_records(llm, ps: list[list[int]]) -> list[tuple[int, int, int, int, int]]:
    """Spies on the rounds runner: per round of each sequence, (prompt index, context length at the
    round's start, proposed, accepted, emitted)."""
    runner, seen = llm.engine.spec_worker.rounds, []
    step = runner.step

    def spy(batch, metrics):
        lens = [len(s) for s in batch.seqs]
        result = step(batch, metrics)
        starts = list(lens)
        for rows, proposed, accepted, emitted in runner.last_rounds:
            for i, p, a, e in zip(rows, proposed, accepted, emitted):
                seen.append((_request(ps, batch.seqs[i]), starts[i], p, a, e))
                starts[i] += e
        return result

    runner.step = spy
    return seen


def test_ngram_rounds_count_as_proposed_only_a_matchs_tokens(target):
    """A round's row without a match proposes nothing (its drafts are the kernel's filler) and one whose
    context ends early proposes what it has: each round's proposal count is the host lookup's
    (ngram.ngram_proposal) at that round's context, its accepted count the leading agreement of that
    proposal with the target's tokens (filler a verify accepted is emitted, not accepted), and on
    contexts where both modes ran a round, rounds and one-round steps record the same counts: the
    acceptance metrics mean the same in both modes."""
    import numpy as np

    from engine.spec_decode.ngram import ngram_proposal
    from engine.spec_decode.rejection import greedy_agreement

    # Some matches accepted, many rounds without one, filler accepted (seed 21: "188" five times).
    ps = _repeating_prompts(len(MAX_TOKENS), seed=21) + _repeating_prompts(len(MAX_TOKENS), seed=34)
    params = [_greedy(m) for m in MAX_TOKENS * 2]
    base, _ = _run(target, ps, params)
    spec = _ngram(4)
    llm = LLM(target, device="cpu", block_size=4, speculative_config=spec)
    seen = _round_records(llm, ps)
    assert [o.token_ids for o in llm.generate(_ids(ps), params)] == base
    assert seen and {p for _, _, p, _, _ in seen} >= {0, 3} and any(e > 1 for _, _, p, _, e in seen if p == 0)
    assert any(a > 0 for _, _, _, a, _ in seen)
    for r, start, p, a, e in seen:
        ctx = ps[r] + base[r][: start - len(ps[r])]
        proposal = ngram_proposal(np.array(ctx), 1, 3, 3).tolist()
        target_tokens = base[r][start - len(ps[r]) :]
        assert p == len(proposal)
        if len(target_tokens) >= len(proposal):  # the target's tokens past max_tokens were dropped
            assert a == greedy_agreement(proposal, target_tokens)
        assert a <= min(p, e - 1)
    m = llm.engine.spec_metrics
    assert m.num_proposed == sum(p for _, _, p, _, _ in seen)
    assert m.num_accepted == sum(a for _, _, _, a, _ in seen) == sum(m.accepted_per_position)
    assert m.num_drafts == sum(p > 0 for _, _, p, _, _ in seen)
    assert m.num_emitted == sum(e for _, _, _, _, e in seen)
    # The one-round engine on the same prompts: its step of a sequence at a context length.
    one = LLM(target, device="cpu", block_size=4, speculative_config=_ngram(1))
    worker, steps = one.engine.spec_worker, {}
    record = worker._record

    def spy(batch, proposed, accepted):
        for s, p, a in zip(batch.seqs, proposed, accepted):
            steps[(_request(ps, s), len(s))] = (p, a)
        record(batch, proposed, accepted)

    worker._record = spy
    assert [o.token_ids for o in one.generate(_ids(ps), params)] == base
    both = [(steps[(r, start)], (p, a)) for r, start, p, a, _ in seen if (r, start) in steps]
    assert len(both) >= 10 and any(p > 0 for _, (p, _) in both) and any(p == 0 for _, (p, _) in both)
    assert any(a > 0 for _, (_, a) in both)
    # Where the one-round step was cut near max_tokens (draft_limit), it proposed fewer.
    assert all(o == rr or (o[0] < rr[0] and o[1] <= rr[1]) for o, rr in both)
