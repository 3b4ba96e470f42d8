"""Speculative decoding with Medusa heads (CPU, fp32, tiny random targets): greedy output equals plain
decoding in ragged and mixed batches, the sampled distribution is the target's, stops inside accepted
runs, rollback under preemption, the features kept are the target's hidden state at the right row,
the auto policy, and every config error named at construction."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from drafts import (assert_mixed_batch_matches_plain, assert_stops_inside_accepted_runs, fitted_medusa_heads,
                    medusa_heads)
from safetensors.torch import load_file, save_file
from tiny_models import SMALL_VOCAB, byte_tokenizer, prompts, small_vocab_model
from token_stats import tv, tv_bound
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from common.medusa import MedusaHeads, load_heads
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfigError
from engine.spec_decode.medusa import MedusaProposer

TARGET = "llama_gqa_untied"
MAX_TOKENS = (5, 17, 9, 30, 1, 12, 23, 2)
NUM_HEADS = 4
PARTIAL_STEPS = 60


@pytest.fixture(scope="module")
def target(model_dir) -> str:
    return model_dir(TARGET, with_tokenizer=True)


# The prompts of the greedy tests, by seed: (count, lo, hi). The heads of a random target do not
# generalise, so the "partial" heads are fitted (briefly) to these.
PROMPTS = {3: (8, 2, 40), 4: (6, 3, 30), 6: (2, 4, 20), 7: (6, 20, 40), 11: (4, 3, 30), 12: (4, 3, 30)}


def _prompts(seed: int) -> list[list[int]]:
    n, lo, hi = PROMPTS[seed]
    return prompts(n, seed=seed, lo=lo, hi=hi)


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory) -> dict[str, str]:
    """"partial": fitted for a few steps to the target's continuations of the tests' prompts (right
    some of the time); "exact": fitted to the stop test's prompts until every draft is accepted;
    "random": N(0, 0.1) weights (almost never right)."""
    root = tmp_path_factory.mktemp("medusa")
    every = [p for seed in PROMPTS for p in _prompts(seed)]
    return {"partial": fitted_medusa_heads(target, str(root / "partial"), every, NUM_HEADS, steps=PARTIAL_STEPS),
            "exact": fitted_medusa_heads(target, str(root / "exact"), prompts(3, seed=5, lo=4, hi=20), NUM_HEADS,
                                         new_tokens=24, steps=200),
            "random": medusa_heads(target, str(root / "random"), NUM_HEADS, 0.1)}


def _ids(ps: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in ps]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _spec(path: str, k: int = 3, **kw) -> dict:
    return {"method": "medusa", "model": path, "num_speculative_tokens": k, **kw}


def _run(target: str, ps, params, spec=None, **kw):
    llm = LLM(target, device="cpu", speculative_config=spec, **kw)
    return [o.token_ids for o in llm.generate(_ids(ps), params)], llm.engine


@pytest.mark.parametrize("k", [1, 3, 4])
def test_greedy_output_equals_plain_decoding_in_a_ragged_batch(target, heads, k):
    ps = _prompts(3)
    params = [_greedy(m) for m in MAX_TOKENS]
    base, _ = _run(target, ps, params)
    out, engine = _run(target, ps, params, _spec(heads["partial"], k))
    assert out == base
    m = engine.spec_metrics
    assert engine.num_spec_steps > 0 and m.num_proposed > 0
    assert 0.02 < m.acceptance_rate < 0.9  # heads that often disagree, and sometimes agree
    assert len(m.proposed_per_position) == k
    assert m.num_accepted == sum(m.accepted_per_position) and m.num_emitted > m.num_accepted


def test_mixed_batch_greedy_sampling_and_logprobs(target, heads):
    """Greedy rows with and without logprobs equal plain decoding (logprobs too) beside sampled rows
    (q kept from the heads' processed distribution), seeded ones reproducible."""
    ps = _prompts(4)
    params = [_greedy(10), _greedy(12, logprobs=2), SamplingParams(temperature=0.9, max_tokens=11, seed=5),
              _greedy(7, logprobs=0), SamplingParams(temperature=1.0, top_k=5, max_tokens=9, logprobs=1), _greedy(14)]
    plain = LLM(target, device="cpu").generate(_ids(ps), params)
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["partial"]))
    spec = llm.generate(_ids(ps), params)
    again = LLM(target, device="cpu", speculative_config=_spec(heads["partial"])).generate(_ids(ps), params)
    assert llm.engine.num_spec_steps > 0 and llm.engine.spec_metrics.num_accepted > 0
    assert_mixed_batch_matches_plain(plain, spec, params)
    assert spec[2].token_ids == again[2].token_ids  # seeded


def test_stop_token_stop_string_and_max_tokens_inside_an_accepted_run(target, heads):
    """Heads fitted until every draft is accepted on these prompts: the stops land inside runs."""
    ps = prompts(3, seed=5, lo=4, hi=20)
    base, _ = _run(target, ps, [_greedy(20)] * 3)
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["exact"], k=4))
    assert_stops_inside_accepted_runs(llm, base, _ids(ps), 20, cut=7)
    m = llm.engine.spec_metrics
    assert m.acceptance_rate == 1.0 and m.mean_accepted_length > 2


def test_min_tokens_bans_stops_in_drafts_and_verify(target, heads):
    ps = _prompts(6)
    base, _ = _run(target, ps, [_greedy(12)] * 2)
    eos_like = base[0][1]
    params = [_greedy(12, stop_token_ids=[eos_like], min_tokens=6), _greedy(12, min_tokens=3)]
    plain, _ = _run(target, ps, params)
    out, engine = _run(target, ps, params, _spec(heads["partial"], k=4))
    assert out == plain and engine.num_spec_steps > 0


def test_rollback_under_preemption(target, heads):
    """A pool too small for every sequence forces recompute: a preempted sequence's feature is stale
    (its length moved on with the recompute's token) and it proposes again only after a verify."""
    ps = _prompts(7)
    params = [_greedy(m) for m in (30, 25, 28, 20, 31, 26)]
    kw = dict(block_size=4, num_kv_blocks=40, max_model_len=128)
    base, _ = _run(target, ps, params, **kw)
    out, engine = _run(target, ps, params, _spec(heads["partial"]), **kw)
    assert engine.scheduler.num_preemptions > 0 and engine.num_spec_steps > 0
    assert out == base
    assert engine.block_manager.num_free_blocks == 40


def test_prefix_caching_with_medusa(target, heads):
    """A second request hits the first one's cached blocks: its prefill computes the rest, its first
    decode step makes its feature, and its output is the plain engine's."""
    shared = _prompts(11)[0] * 3
    ps = [shared + [5, 6, 7], shared + [9, 10]]
    params = [_greedy(15), _greedy(15)]
    base, _ = _run(target, ps, params, block_size=8, enable_prefix_caching=False)
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["partial"]), block_size=8)
    first = llm.generate(_ids(ps[:1]), params[:1])
    second = llm.generate(_ids(ps[1:]), params[1:])
    assert second[0].num_cached_tokens >= 8 and llm.engine.num_spec_steps > 0
    assert [first[0].token_ids, second[0].token_ids] == base


def test_the_kept_feature_is_the_targets_hidden_state_of_the_last_token(target, heads):
    """After each step, a sequence with a current feature holds the target's final hidden state
    (transformers') at the position before its last token: the row whose logits gave that token,
    start_i + accepted_i of the verify, in a ragged batch with acceptances and rejections."""
    ps = _prompts(11)
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["partial"]))
    engine = llm.engine
    for p, m in zip(ps, (20, 9, 15, 12)):
        engine.add_request(p, _greedy(m))
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    checked = 0
    while engine.has_unfinished_requests():
        for seq in engine.step():
            kept = seq.spec_feature
            if seq.is_finished or kept is None or kept[2] != len(seq):
                continue
            with torch.no_grad():
                ref = model(torch.tensor([seq.token_ids[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(kept[0][kept[1]], ref, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 10 and engine.spec_metrics.num_accepted > 0


def test_features_of_several_verifies_are_gathered_in_one_index(target, heads):
    """Sequences whose features come from two verifies (and one stale): one cat and one index_select
    give each its row; rows of one verify in order are used as they are."""
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["random"]))
    proposer: MedusaProposer = llm.engine.spec_worker.proposer
    from engine.sequence import Sequence

    seqs = [Sequence([1] * n, _greedy(4)) for n in (3, 4, 5, 6)]
    a, b = torch.randn(2, 64), torch.randn(3, 64)
    seqs[0].spec_feature = (b, 2, 3)
    seqs[1].spec_feature = (a, 1, 4)
    seqs[2].spec_feature = (b, 0, 99)  # stale: another length
    seqs[3].spec_feature = (a, 0, 6)
    feats, have = proposer.features(seqs)
    assert have == [True, True, False, True]
    torch.testing.assert_close(feats[[0, 1, 3]], torch.stack([b[2], a[1], a[0]]))
    same = [Sequence([1] * 3, _greedy(4)) for _ in range(2)]
    for i, s in enumerate(same):
        s.spec_feature = (a, i, 3)
    assert proposer.features(same)[0] is a
    proposal = proposer.propose(seqs, [2, 2, 2, 1])
    assert proposal.counts == [2, 2, 0, 1] and proposal.ids.shape == (4, 2)


def test_stacked_heads_equal_the_reference_module(target, heads):
    """The proposer's batched heads (one baddbmm per block for all heads) compute MedusaHeads.forward."""
    ref = load_heads(heads["random"])
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["random"]))
    proposer = llm.engine.spec_worker.proposer
    f = torch.randn(5, 64)
    torch.testing.assert_close(proposer.head_states(f, 3), ref(f, 3), atol=1e-5, rtol=1e-5)
    two = MedusaHeads(64, 256, 2, num_layers=2)
    with torch.no_grad():
        for p in two.parameters():
            p.normal_(0, 0.1)
    stacked = MedusaProposer(llm.engine.runner, two, frozenset())
    torch.testing.assert_close(stacked.head_states(f, 2), two(f), atol=1e-5, rtol=1e-5)


def test_auto_policy_measures_the_heads_and_keeps_greedy_output(target, heads):
    ps = _prompts(12)
    params = [_greedy(m) for m in (20, 9, 15, 12)]
    base, _ = _run(target, ps, params)
    out, engine = _run(target, ps, params, _spec(heads["partial"], num_speculative_tokens_per_batch_size="auto"))
    assert out == base
    policy = engine.spec_worker.policy
    costs = policy.costs
    assert not costs.catch_up and all(t > 0 for row in costs.draft.values() for t in row)
    assert policy.acceptance.num_observed > 0 and sum(policy.steps_by_k[1:]) > 0


def test_a_round_that_only_made_features_runs_its_k_again(target, heads):
    """After plain steps no sequence has a feature: the policy's probe round only verifies the last
    tokens, so the next step runs the same k (SpecPolicy.k_again), with proposals to observe."""
    llm = LLM(target, device="cpu", speculative_config=_spec(heads["partial"],
                                                             num_speculative_tokens_per_batch_size="auto"))
    worker = llm.engine.spec_worker
    policy = worker.policy
    policy.last_k, worker._warm_up = 2, True
    before = list(policy.steps_by_k)
    assert worker.k_for_step(1) == 2 and not worker._warm_up
    assert policy.steps_by_k[2] == before[2] + 1
    worker._warm_up = True
    assert worker.k_for_step(policy.max_batch_size + 1) == 0


def test_poor_heads_stop_speculating_and_each_probe_makes_features_first(target, heads):
    """Random heads with a costly draft (injected costs, as test_spec_auto's bad draft model): after
    the warm-up the policy decodes plainly; each probe's first round only makes the features (plain
    steps leave none) and its k runs again to observe the heads, so a probe is two speculative steps."""
    from engine.spec_decode import policy as P
    from engine.spec_decode.policy import SpecPolicy
    from test_spec_auto import K, _injected

    ps = _prompts(6)
    params = _greedy(90)
    base, _ = _run(target, ps, [params] * 2, num_decode_steps=1)
    llm = LLM(target, device="cpu", num_decode_steps=1,
              speculative_config=_spec(heads["random"], K, num_speculative_tokens_per_batch_size="auto"))
    engine = llm.engine
    policy = engine.spec_worker.policy = SpecPolicy(K, 16, _injected([1, 2, 4, 8, 16], 0.2, True), calibrate=False)
    assert [o.token_ids for o in llm.generate(_ids(ps), [params] * 2)] == base
    warm_steps = P.WARMUP_TRIALS // len(ps)  # observed rounds, each of both sequences
    assert policy.num_probes >= 1
    assert engine.num_spec_steps == 1 + warm_steps + 2 * policy.num_probes  # + the first, featureless round
    assert policy.steps_by_k[K] == engine.num_spec_steps and policy.steps_by_k[0] > 3 * engine.num_spec_steps
    assert policy.acceptance.num_observed == len(ps) * (warm_steps + policy.num_probes)
    assert engine.spec_metrics.acceptance_rate < 0.1


# -- the sampled distribution is the target's -------------------------------------------------------------
@pytest.mark.parametrize("temp,top_k,seeded", [(0.8, 0, False), (1.0, 5, False), (0.8, 0, True)])
def test_sampled_tokens_follow_the_target_distribution(tmp_path, temp, top_k, seeded):
    """Many samples of output tokens 2 and 3 (token 1's round only makes the features; tokens 2 and 3
    come from rounds with k = 2 drafts of poor random heads) against the target's exact marginals
    after temperature and top-k, within the phase-1 TV bound. Drafts are independent per position;
    rejection sampling needs only that q_j is what d_j was drawn from."""
    target = small_vocab_model(tmp_path / "target", 0)
    head_dir = medusa_heads(target, str(tmp_path / "heads"), 2, 0.3, seed=3, tokenizer=False)
    prompt, n = [3, 7, 1], 3000
    llm = LLM(target, device="cpu", max_num_seqs=n, max_model_len=16,
              speculative_config=_spec(head_dir, k=2, max_batch_size=n))
    params = [SamplingParams(temperature=temp, top_k=top_k, max_tokens=5, seed=i if seeded else None)
              for i in range(n)]  # seeded: every request its own seed, all draws from counters
    out = llm.generate(_ids([prompt] * n), params)
    m = llm.engine.spec_metrics
    assert llm.engine.num_spec_steps > 0 and m.num_proposed > 0 and 0 < m.acceptance_rate < 1
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def probs(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor(prefixes)).logits[:, -1] / temp
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    # joint[j]: the distribution of output tokens 0..j, flattened; marginal of token j from it.
    joint = probs([prompt])[0]
    tails = [[]]
    for j in range(1, 4):
        tails = [t + [v] for t in tails for v in range(SMALL_VOCAB)]
        joint = (joint[:, None] * probs([prompt + t for t in tails])).reshape(-1)
        if j >= 2:
            p = joint.view(-1, SMALL_VOCAB).sum(0)
            counts = torch.bincount(torch.tensor([o.token_ids[j] for o in out]), minlength=SMALL_VOCAB).float()
            assert tv(counts, p) < tv_bound(n, SMALL_VOCAB), (j, tv(counts, p))


# -- every bad config is named at construction ------------------------------------------------------
def _no_model_built(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before the speculative config was checked")
    monkeypatch.setattr("engine.llm_engine.ModelRunner", refuse)


@pytest.mark.parametrize("extra,key", [
    ({"num_rounds": 2}, "num_rounds"), ({"draft_vocab_size": 100}, "draft_vocab_size"),
    ({"draft_tensor_parallel_size": 1}, "draft_tensor_parallel_size"), ({"dtype": "float32"}, "dtype"),
    ({"prompt_lookup_min": 2}, "prompt_lookup_min"), ({"num_speculative_tokens": 5}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"), ({"max_batch_size": 0}, "max_batch_size"),
])
def test_keys_that_do_not_apply_and_bad_values_are_named(target, heads, monkeypatch, extra, key):
    _no_model_built(monkeypatch)
    with pytest.raises(SpeculativeConfigError) as e:
        LLM(target, device="cpu", speculative_config=_spec(heads["random"], **extra))
    assert e.value.key == key and key in str(e.value)


def _copy(src: str, dst, edit_config=None, edit_weights=None) -> str:
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_weights:
        state = load_file(str(dst / "model.safetensors"))
        edit_weights(state)
        save_file(state, str(dst / "model.safetensors"))
    return str(dst)


def test_heads_that_do_not_fit_the_target_are_named(target, heads, monkeypatch, tmp_path, model_dir):
    _no_model_built(monkeypatch)
    src = heads["random"]
    cases = {
        "hidden_size": _copy(src, tmp_path / "h", lambda c: c.update(hidden_size=32),
                             lambda s: s.update({k: v[..., :32][:32].clone() for k, v in s.items()})),
        "vocab_size": _copy(src, tmp_path / "v", lambda c: c.update(vocab_size=128)),
        "heads.3.0.bias": _copy(src, tmp_path / "w", edit_weights=lambda s: s.pop("heads.3.0.bias")),
    }
    for what, path in cases.items():
        with pytest.raises(SpeculativeConfigError, match=what) as e:
            LLM(target, device="cpu", speculative_config=_spec(path))
        assert e.value.key == "model"
    # Other tokens at the same ids: the vocabulary check names the first that differs.
    other = tmp_path / "t"
    shutil.copytree(src, other)
    for name in os.listdir(other):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.remove(other / name)
    tok = byte_tokenizer()
    vocab = tok.get_vocab()
    swapped = {t: (255 - i if i in (0, 255) else i) for t, i in vocab.items()}
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=swapped, merges=[]))).save_pretrained(other)
    with pytest.raises(SpeculativeConfigError, match="token id") as e:
        LLM(target, device="cpu", speculative_config=_spec(str(other)))
    assert e.value.key == "model"


def test_a_wrong_directory_or_method_is_named(target, heads, monkeypatch, model_dir):
    _no_model_built(monkeypatch)
    with pytest.raises(SpeculativeConfigError, match="not a Medusa heads directory") as e:
        LLM(target, device="cpu", speculative_config=_spec(model_dir("llama_mha_tied", with_tokenizer=True)))
    assert e.value.key == "model"
    with pytest.raises(SpeculativeConfigError, match="give method 'medusa'") as e:
        LLM(target, device="cpu", speculative_config={"model": heads["random"], "num_speculative_tokens": 2})
    assert e.value.key == "model"
    with pytest.raises(SpeculativeConfigError, match="one rank") as e:
        LLM(target, device="cpu", tensor_parallel_size=2, speculative_config=_spec(heads["random"]))
    assert e.value.key == "method"


# -- the verify forward's hidden rows --------------------------------------------------------------------
def test_every_eager_verify_path_gives_hidden_rows_aligned_with_its_logits(model_dir, monkeypatch):
    """all_logits(hidden=True) on each path (pseudo-rows, prefill, both multi-query variants, and
    pseudo-rows in groups as batch-invariant mode runs them): the same logits as without, and the
    LM head of each hidden row gives its logit row; every path's hidden rows agree."""
    from test_mq_verify import uniform_chunks
    from verify_batch import verify_chunks, verify_runner

    _, runner = verify_runner(model_dir(TARGET))
    paths = runner.verify_paths
    ragged = {}  # verify_chunks()'s hidden rows, by path
    with torch.inference_mode():
        for chunks in (verify_chunks(), uniform_chunks()):
            ref = paths.prefill_all_logits(chunks).clone()
            names = [n for n in paths.forwards() if n != "pseudo_rows_mq" or chunks == uniform_chunks()]
            states = {}
            for name in names:
                logits, hidden = (t.clone() for t in paths.forwards()[name](chunks, None, hidden=True))
                assert hidden.shape == (len(ref), 64) and hidden.dtype == runner.dtype
                torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(runner.model.compute_logits(hidden).float(), logits, rtol=1e-6, atol=1e-6)
                states[name] = hidden
            assert len(states) == (4 if chunks == uniform_chunks() else 3)
            ragged = ragged or states
            for hidden in states.values():
                torch.testing.assert_close(hidden, states["prefill"], rtol=1e-5, atol=1e-5)
            step = paths.all_logits(chunks, hidden=True)
            torch.testing.assert_close(step[1], states["prefill"], rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(paths, "batch_invariant", True)  # forwards of at most 4 rows, chunks cut
        monkeypatch.setattr(paths, "max_pseudo_rows", 4)
        logits, hidden = paths.pseudo_row_logits(verify_chunks(), hidden=True)
        torch.testing.assert_close(hidden, ragged["prefill"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runner.model.compute_logits(hidden).float(), logits, rtol=1e-6, atol=1e-6)
