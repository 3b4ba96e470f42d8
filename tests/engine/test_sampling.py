"""Sampling parameters end to end: seeds, filters, stops, max_tokens, logprobs, prompt logprobs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts
from token_stats import tv, tv_bound
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.layers.sampler import (
    DRAW_ACCEPT, DRAW_DRAFT, DRAW_TOKEN, SeededRows, counter_uniforms, inverse_cdf, mix64, sample, seeded_rows,
)
from engine.sequence import Sequence

ARCH = "llama_gqa_untied"


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir(ARCH, with_tokenizer=True), device="cpu", max_model_len=256, block_size=4)


def greedy_tokens(llm, p, n=16):
    return llm.generate([p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].token_ids


# -- the sampler alone ----------------------------------------------------------------------------
def _freqs(logits, params, n=20000):
    rows = logits.expand(n, -1).clone()
    tokens = sample(rows, [params] * n)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def test_sampler_matches_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    for t in (1.0, 0.5):
        f = _freqs(logits, SamplingParams(temperature=t))
        assert torch.allclose(f, torch.softmax(logits[0] / t, -1), atol=0.015)


def test_sampler_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = torch.softmax(logits[0], -1)  # [0.55, 0.20, 0.12, 0.03, 0.07] roughly
    f = _freqs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(f[:2], p[:2] / p[:2].sum(), atol=0.015) and f[2:].sum() == 0
    f = _freqs(logits, SamplingParams(temperature=1.0, top_p=0.7))  # 0.55 < 0.7 -> keep 2 tokens
    assert f[2:].sum() == 0 and f[1] > 0.2
    f = _freqs(logits, SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.2 * 0.55
    assert f[3].item() == 0 and f[4].item() == 0 and f[2] > 0
    mixed = sample(logits.expand(2, -1).clone(), [SamplingParams(temperature=0), SamplingParams(top_k=1)])
    assert mixed.tolist() == [0, 0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    ps = prompts(6, seed=11, lo=3, hi=30)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([ps[0]], seeded)[0].token_ids
    batched = llm.generate(ps, [seeded] + [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)] * 5)
    assert batched[0].token_ids == alone
    other_seed = llm.generate([ps[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_seeded_requests_keep_their_tokens_through_preemption(model_dir):
    """A recompute after preemption samples its next token at the same output position, so a seeded
    request's tokens equal those of a run with room for every sequence (the counters are positions)."""
    ps = prompts(12, seed=18, lo=10, hi=40)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=24, ignore_eos=True)
              for i in range(len(ps))]
    roomy = LLM(model_dir(ARCH), device="cpu", max_model_len=128, block_size=4)
    tight = LLM(model_dir(ARCH), device="cpu", max_model_len=128, block_size=4, num_kv_blocks=40,
                max_num_batched_tokens=64)
    want = [o.token_ids for o in roomy.generate(ps, params)]
    got = [o.token_ids for o in tight.generate(ps, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-6), dict(temperature=1.0, min_p=1.0),
])
def test_degenerate_filters_equal_greedy(llm, params):
    p = prompts(1, seed=12, lo=10, hi=11)[0]
    out = llm.generate([p], SamplingParams(max_tokens=10, ignore_eos=True, seed=3, **params))[0]
    assert out.token_ids == greedy_tokens(llm, p, 10)


# -- counter-based draws of seeded rows ------------------------------------------------------------
def _splitmix64_finalizer(x: int) -> int:
    """The reference on Python ints (unsigned 64-bit words)."""
    m = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_mix64_and_counter_uniforms_match_splitmix64_on_python_ints():
    """Signed int64 ops (arithmetic shifts masked, wrapping products) give the unsigned reference's
    bits, for seeds across the whole 64-bit range (negative ones and those >= 2**63 included)."""
    words = [0, 1, 2, 12345, 2**31 - 1, 2**32 + 7, 2**62 + 3, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1,
             0x9E3779B97F4A7C15, 0xDEADBEEFCAFEF00D]
    signed = torch.tensor([w - 2**64 if w >= 2**63 else w for w in words], dtype=torch.int64)
    got = [w & (2**64 - 1) for w in mix64(signed).tolist()]
    assert got == [_splitmix64_finalizer(w) for w in words]
    counters = torch.tensor([0, 1, 5, 3 * 255 + 2], dtype=torch.int64)
    u = counter_uniforms(signed[:, None], counters[None, :])
    for i, w in enumerate(words):
        for j, c in enumerate(counters.tolist()):
            z = _splitmix64_finalizer((_splitmix64_finalizer(w) + (c + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1))
            assert u[i, j].item() == (z >> 11) / 2.0**53
    assert u.dtype == torch.float64 and 0.0 <= u.min() and u.max() < 1.0


def test_counter_uniforms_are_uniform_and_distinct_by_kind():
    """Consecutive seeds and positions (as the teacher data uses them) give uniform, uncorrelated draws."""
    seeds = torch.arange(4000, dtype=torch.int64)
    rows = SeededRows(list(range(4000)), seeds.tolist(), [7] * 4000, 4000, torch.device("cpu"))
    kinds = [rows.uniforms(k) for k in (DRAW_TOKEN, DRAW_DRAFT, DRAW_ACCEPT)]
    for u in kinds:
        counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
        assert tv(counts, torch.full((10,), 0.1)) <= tv_bound(len(u), 10)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(torch.corrcoef(torch.stack([kinds[a], kinds[b]]))[0, 1]) < 0.06
    later = rows.uniforms(DRAW_TOKEN, 1)  # the next position
    assert abs(torch.corrcoef(torch.stack([kinds[0], later]))[0, 1]) < 0.06


def test_inverse_cdf_is_exact_over_a_large_vocabulary_and_skips_zero_probabilities():
    """A uniform row of 49,152 tokens: u = (j + 1/2) / V picks token j everywhere, the last ones
    included (the cumsum must be exact to well under a token's 2e-5 of the mass: a sequential fp32
    sum's error bound there is about 3e-3). Zero-probability tokens at either end are never
    picked, even for u = 0 and the largest u below 1."""
    v = 49152
    probs = torch.full((1, v), 1.0 / v)
    js = torch.tensor([0, 1, 777, v // 2, v - 1000, v - 3, v - 2, v - 1])
    u = (js.double() + 0.5) / v
    assert inverse_cdf(probs.expand(len(js), -1), u).tolist() == js.tolist()
    edge = torch.zeros(2, 9)
    edge[:, 2:6] = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf(edge, u).tolist() == [2, 5]
    scaled = edge * 3.0  # not normalised: the draw uses the row's total
    assert inverse_cdf(scaled, torch.tensor([0.099, 0.101], dtype=torch.float64)).tolist() == [2, 4]


def _seeded_freqs(logits, params, n=20000, position=0):
    """Frequencies of n seeded draws from one row: request i has seed 7 * i + 1, at ``position``."""
    ps = [SamplingParams(**{**params, "seed": 7 * i + 1}) for i in range(n)]
    seeded = SeededRows.of(ps, [position] * n, logits.device)
    tokens = sample(logits.expand(n, -1).clone(), ps, seeded)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float()


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=4),
                                    dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.1)])
def test_seeded_draws_follow_the_filtered_softmax(params):
    """Many seeds on one small-vocabulary row: the draws' total variation from the filtered,
    temperature-scaled softmax is within the bound that exact samples exceed with probability
    1e-6; removed tokens are never drawn. Fixed seeds: deterministic."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5, -0.5, 0.8]])
    p = torch.softmax(logits / params["temperature"], -1)[0]
    if "top_k" in params:
        p[p.argsort(descending=True)[params["top_k"]:]] = 0
    if "top_p" in params:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        p[order[before >= params["top_p"]]] = 0
    if "min_p" in params:
        p[p < params["min_p"] * p.max()] = 0
    p = p / p.sum()
    for position in (0, 41):
        counts = _seeded_freqs(logits, params, position=position)
        assert counts[p == 0].sum() == 0
        assert tv(counts, p) <= tv_bound(int(counts.sum()), len(p)), (params, position, tv(counts, p))


def test_seeded_rows_never_pick_a_filtered_token_in_a_large_vocabulary():
    """A 49,152-token row where top-k, top-p and min-p each keep a few tokens at scattered ids:
    seeded draws stay inside the kept set (and take more than one of its tokens)."""
    v = 49152
    logits = torch.randn(1, v, generator=torch.Generator().manual_seed(5))
    hot = torch.tensor([3, 9000, 30001, v - 1])
    logits[0, hot] = torch.tensor([20.0, 19.8, 19.6, 19.9])  # the rest of the mass is about 2e-4
    for params, kept in ((dict(temperature=1.0, top_k=3), [3, v - 1, 9000]),
                         (dict(temperature=1.0, top_p=0.5), [3, v - 1]),
                         (dict(temperature=1.0, min_p=0.6), [3, v - 1, 9000, 30001])):
        counts = _seeded_freqs(logits, params, n=300)
        drawn = set(counts.nonzero().flatten().tolist())
        assert drawn <= set(kept) and len(drawn) > 1, (params, drawn)


def test_a_seeded_row_depends_only_on_its_seed_logits_and_position():
    """The same seeded row at another index of another batch (beside unseeded and greedy rows) draws
    the same token; another position or seed draws another token for some of many seeds."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 300, generator=g)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (11, 12, 13)]
    alone = sample(logits[:3].clone(), params, SeededRows.of(params, [4, 0, 9], logits.device))
    mixed = [SamplingParams(temperature=0.0), params[2], SamplingParams(temperature=1.0), params[0], params[1]]
    rows = torch.stack([logits[0], logits[2], logits[4], logits[0], logits[1]])
    torch.manual_seed(1)
    got = sample(rows, mixed, SeededRows.of(mixed, [0, 9, 3, 4, 0], logits.device))
    assert got[[3, 4, 1]].tolist() == alone.tolist()
    assert got[0].item() == logits[0].argmax().item()
    many = [SamplingParams(temperature=1.0, seed=s) for s in range(200)]
    row = logits[:1].expand(200, -1).clone()
    at = [sample(row, many, SeededRows.of(many, [pos] * 200, row.device)) for pos in (5, 6)]
    assert (at[0] != at[1]).sum() > 150


def test_seeded_rows_of_sequences_and_their_errors():
    """seeded_rows: a sequence's position is its number of output tokens (plus j for a drafter's
    j-th row); greedy rows and rows without a seed are left to the global generator; a seeded row
    without a position is an error that says so."""
    seqs = [Sequence([1, 2, 3, 4, 5], SamplingParams(temperature=1.0, seed=3)),
            Sequence([1], SamplingParams(temperature=0.0, seed=4)),
            Sequence([1, 2], SamplingParams(temperature=1.0))]
    seqs[0].num_prompt_tokens = 2  # three tokens generated
    rows = seeded_rows(seqs, torch.device("cpu"), steps=2)
    assert rows.rows == [0, 1] and rows.positions.tolist() == [3, 4] and rows.seeds.tolist() == [3, 3]
    assert seeded_rows(seqs[1:], torch.device("cpu")) is None
    big = SeededRows.of([SamplingParams(seed=2**64 - 1)], [0], torch.device("cpu"))
    assert big.seeds.tolist() == [-1]  # the same 64 bits
    with pytest.raises(ValueError, match="output position"):
        SeededRows.of([SamplingParams(seed=1)], None, torch.device("cpu"))
    with pytest.raises(ValueError, match="SeededRows"):  # not a silent draw from the global generator
        sample(torch.zeros(1, 4), [SamplingParams(seed=1)])


@pytest.mark.gpu
def test_seeded_draws_on_cuda_equal_the_cpus_and_never_wait_for_the_device():
    """The int64 mixer gives the same bits on the GPU (wrapping products, masked shifts); a mixed
    batch of greedy, unseeded and seeded rows samples without a device sync."""
    dev = torch.device("cuda")
    seeds = torch.tensor([0, 1, -1, 2**62 + 5, -(2**63), 123456789], dtype=torch.int64)
    counters = torch.arange(0, 3000, 7, dtype=torch.int64)
    cpu = counter_uniforms(seeds[:, None], counters[None, :])
    assert torch.equal(counter_uniforms(seeds[:, None].to(dev), counters[None, :].to(dev)).cpu(), cpu)
    v = 49152
    js = torch.tensor([0, 5, v // 3, v - 2, v - 1])
    probs = torch.full((len(js), v), 1.0 / v, device=dev)
    assert inverse_cdf(probs, ((js.double() + 0.5) / v).to(dev)).tolist() == js.tolist()
    b = 64
    logits = torch.randn(b, 32000, device=dev)
    params = [SamplingParams(temperature=0.0) if i % 4 == 0 else
              SamplingParams(temperature=0.9, top_p=0.95, seed=i if i % 2 else None) for i in range(b)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, params, SeededRows.of(params, list(range(b)), dev))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = sample(logits, params, SeededRows.of(params, list(range(b)), dev))
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    assert tokens[seeded].tolist() == again[seeded].tolist()


# -- stopping -------------------------------------------------------------------------------------
def test_max_tokens_and_stop_token_ids(llm):
    p = prompts(1, seed=13, lo=10, hi=11)[0]
    ref = greedy_tokens(llm, p, 16)
    out = llm.generate([p] * 2, [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                 SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ref[3]], ignore_eos=True)])
    assert out[0].token_ids == ref[:5] and out[0].finish_reason == "length"
    first = ref.index(ref[3])
    assert out[1].token_ids == ref[: first + 1]
    assert out[1].finish_reason == "stop" and out[1].stop_reason == ref[3]


def test_eos_stops_unless_ignored(llm):
    p = prompts(1, seed=14, lo=10, hi=11)[0]
    ref = greedy_tokens(llm, p, 16)
    saved = set(llm.engine.eos_token_ids)
    llm.engine.eos_token_ids = {ref[4]}  # pretend the model's EOS is the 5th token it emits
    try:
        stopped = llm.generate([p], SamplingParams(temperature=0, max_tokens=16))[0]
        ignored = llm.generate([p], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    finally:
        llm.engine.eos_token_ids = saved
    assert stopped.token_ids == ref[: ref.index(ref[4]) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == ref


def test_min_tokens_masks_eos_and_stop_ids(llm):
    p = prompts(1, seed=17, lo=10, hi=11)[0]
    ref = greedy_tokens(llm, p, 16)
    saved = set(llm.engine.eos_token_ids)
    llm.engine.eos_token_ids = llm.engine.runner.sampler.eos_token_ids = {ref[0]}  # the first greedy token is "EOS"
    try:
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, min_tokens=3,
                                               stop_token_ids=[ref[1]]))[0]
    finally:
        llm.engine.eos_token_ids = llm.engine.runner.sampler.eos_token_ids = saved
    assert len(out.token_ids) >= 3
    assert ref[0] not in out.token_ids[:3] and ref[1] not in out.token_ids[:3]


def test_stop_string_cuts_text(llm):
    prompt = "hello world"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert len(full.text) >= 8
    stop = full.text[5:7]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    cut = full.text.find(stop)
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)


# -- logprobs ---------------------------------------------------------------------------------------
def test_logprobs_and_prompt_logprobs_match_transformers(llm, model_dir):
    p = prompts(1, seed=15, lo=12, hi=13)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2))[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir(ARCH, with_tokenizer=True), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p + out.token_ids])).logits[0].float(), -1)
    assert len(out.logprobs) == 6
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(p) - 1 + j]
        assert entry[tok].rank == 1  # greedy picked the most likely token
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(entry) and [entry[t].rank for t in top] == [1, 2, 3]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for k in range(1, len(p)):
        entry = out.prompt_logprobs[k]
        assert abs(entry[p[k]].logprob - ref[k - 1, p[k]].item()) < 1e-4
        assert entry[p[k]].rank == int((ref[k - 1] > ref[k - 1, p[k]]).sum()) + 1
        assert len(entry) in (2, 3)  # top-2 plus the actual token if it is not among them


def test_prompt_logprobs_across_chunks(model_dir):
    llm = LLM(model_dir(ARCH), device="cpu", max_model_len=256, block_size=4, max_num_batched_tokens=8)
    p = prompts(1, seed=16, lo=30, hi=31)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=0))[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir(ARCH), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
    got = torch.tensor([out.prompt_logprobs[k][p[k]].logprob for k in range(1, len(p))])
    want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    assert torch.allclose(got, want, atol=1e-4)


def test_sampler_step_result_has_a_token_list_per_sequence():
    # Row -1: a prompt chunk that samples nothing; logprobs only where the request asked for them;
    # min_tokens keeps the EOS (the argmax) out until then, while the logprobs stay the model's.
    import torch

    from engine.layers.sampler import Sampler
    from engine.sequence import Sequence

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    seqs = [Sequence([0, 1], SamplingParams(temperature=0.0)),
            Sequence([0], SamplingParams(temperature=0.0, logprobs=1, min_tokens=1)),
            Sequence([2], SamplingParams(temperature=0.0))]
    result = Sampler(torch.device("cpu"), {0}).sample_step(seqs, logits, [-1, 0, 1])
    assert result.tokens == [[], [2], [1]]
    assert [len(lp) for lp in result.logprobs] == [0, 1, 0]
    (entry,) = result.logprobs[1]
    assert entry[2].rank == 2 and entry[0].rank == 1  # the model's own ranking of the row
    assert Sampler(torch.device("cpu"), set()).sample_step(seqs[2:], logits[1:]).tokens == [[1]]  # plain greedy


def test_the_sampler_reuses_a_batch_only_while_the_same_sequences_sample():
    """Sampler.sample_step keeps the per-row parameters of the sequences that sampled last (BatchRows).
    Step after step, as sequences leave, join, change order, pass min_tokens, ask for logprobs or sample
    from a prefill's rows, its tokens and logprobs equal a fresh Sampler's at each step, and the kept
    parameters are reused exactly while the same sequences sample in the same order."""
    from engine.layers.sampler import Sampler

    g = torch.Generator().manual_seed(21)
    eos = {5}
    seqs = [Sequence([1, 2, 3], SamplingParams(temperature=1.0, seed=7)),
            Sequence([4], SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])),
            Sequence([1, 2], SamplingParams(temperature=0.7, top_p=0.8, seed=8, logprobs=2)),
            Sequence([3, 3], SamplingParams(temperature=1.0, top_k=5)),
            Sequence([2], SamplingParams(temperature=1.0, min_p=0.2, seed=9, min_tokens=1))]
    kept = Sampler(torch.device("cpu"), eos)
    # (sequences, prefill rows or None); the last two steps: plain greedy once past min_tokens
    steps = [([0, 1, 2, 3, 4], None)] * 3 + [([0, 2, 3, 4], None), ([4, 0, 2, 3], None), ([4, 0, 2, 3, 1], None),
                                             ([4, 0, 2], [0, -1, 1]), ([4, 0, 2], None), ([1], None), ([1], None)]
    previous = None
    for step, (which, rows) in enumerate(steps):
        batch = [seqs[i] for i in which]
        logits = 3 * torch.randn(len(batch) if rows is None else max(rows) + 1, 40, generator=g)
        logits[:, 5] += 6  # the EOS and the stop id lead until masked
        logits[:, 9] += 6
        torch.manual_seed(step)
        got = kept.sample_step(batch, logits, rows)
        torch.manual_seed(step)
        want = Sampler(torch.device("cpu"), eos).sample_step(batch, logits, rows)
        assert got.tokens == want.tokens and got.logprobs == want.logprobs
        reused = kept._batch is previous
        assert reused == (step > 0 and steps[step - 1] == (which, None) and rows is None)
        previous = kept._batch
        for s, t in zip(batch, got.tokens):
            s.token_ids.extend(t)
    assert 5 not in seqs[1].output_token_ids[:2] and 9 not in seqs[1].output_token_ids[:2]  # min_tokens held


def test_seeded_tokens_and_finishes_do_not_depend_on_the_batch_around_them(model_dir):
    """Every request's tokens, finish and text are those it gets alone, in a batch whose composition
    changes step after step: requests finish inside a step by max_tokens, a stop token id, EOS,
    max_model_len or a stop string, and waiting ones join as others leave (the engine's stop check,
    skipped for tokens that cannot finish a row, and the sampler's per-composition parameters)."""
    path = model_dir(ARCH, with_tokenizer=True)
    llm = LLM(path, device="cpu", max_model_len=40, block_size=4, max_num_seqs=3)
    ps = prompts(7, seed=31, lo=5, hi=20)
    free = [SamplingParams(temperature=1.0, seed=60 + i, max_tokens=34, ignore_eos=True) for i in range(len(ps))]
    ref = [llm.generate([p], f)[0].token_ids for p, f in zip(ps, free)]
    saved = set(llm.engine.eos_token_ids)
    params = [SamplingParams(temperature=1.0, seed=60, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=61, max_tokens=34, stop_token_ids=[ref[1][5]], ignore_eos=True),
              SamplingParams(temperature=1.0, seed=62, max_tokens=34, ignore_eos=True),  # max_model_len ends it
              SamplingParams(temperature=1.0, seed=63, max_tokens=34, stop=[llm.tokenizer.decode(ref[3][4:6])],
                             ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, min_tokens=3),
              SamplingParams(temperature=1.0, seed=65, max_tokens=34),  # EOS: the token it draws 4th
              SamplingParams(temperature=0.8, seed=66, max_tokens=12, ignore_eos=True, logprobs=1)]
    llm.engine.eos_token_ids = llm.engine.runner.sampler.eos_token_ids = {ref[5][3]}
    try:
        alone = [llm.generate([p], q)[0] for p, q in zip(ps, params)]
        together = llm.generate(ps, params)
    finally:
        llm.engine.eos_token_ids = llm.engine.runner.sampler.eos_token_ids = saved
    for a, b in zip(alone, together):
        assert (b.token_ids, b.finish_reason, b.stop_reason, b.text) == (a.token_ids, a.finish_reason, a.stop_reason,
                                                                          a.text)
        if a.logprobs is not None:  # the same entries, to the last bits a batch's shapes change
            assert [{t: lp.rank for t, lp in e.items()} for e in b.logprobs] == \
                [{t: lp.rank for t, lp in e.items()} for e in a.logprobs]
            assert all(abs(x.logprob - y.logprob) < 1e-4 for e, f in zip(a.logprobs, b.logprobs)
                       for x, y in zip(e.values(), f.values()))
    assert together[0].token_ids == ref[0][:7] and together[0].finish_reason == "length"
    cut = ref[1].index(ref[1][5]) + 1
    assert together[1].token_ids == ref[1][:cut] and together[1].stop_reason == ref[1][5]
    assert together[2].token_ids == ref[2][: 40 - len(ps[2])] and together[2].finish_reason == "length"
    assert together[3].finish_reason == "stop" and isinstance(together[3].stop_reason, str)
    assert together[5].token_ids == ref[5][: ref[5].index(ref[5][3]) + 1] and together[5].finish_reason == "stop"


def test_seeded_rows_draw_the_counter_uniforms_of_their_seeds_at_any_position():
    """SeededRows hashes each seed's state once (state_uniforms) and SeededRows.at moves the rows to
    other positions: the uniforms stay counter_uniforms(seed, position * NUM_DRAW_KINDS + kind)."""
    from engine.layers.sampler import NUM_DRAW_KINDS

    seeds, positions = [5, 2**64 - 3, -7], [0, 11, 4]
    rows = SeededRows([0, 2, 3], seeds, positions, 4, torch.device("cpu"))
    signed = torch.tensor([5, -3, -7])
    for r, pos in ((rows, positions), (rows.at([9, 1, 30]), [9, 1, 30])):
        for kind in (DRAW_TOKEN, DRAW_DRAFT, DRAW_ACCEPT):
            want = counter_uniforms(signed, torch.tensor(pos) * NUM_DRAW_KINDS + kind)
            assert torch.equal(r.uniforms(kind), want)
    assert rows.positions.tolist() == positions  # at() leaves the original where it was
