"""Sampling parameters end to end: seeds, filters, stops, max_tokens, logprobs, prompt logprobs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.layers.sampler import sample

ARCH = "llama_gqa_untied"


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir(ARCH, with_tokenizer=True), device="cpu", max_model_len=256, block_size=4)


def greedy_tokens(llm, p, n=16):
    return llm.generate([p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].token_ids


# -- the sampler alone ----------------------------------------------------------------------------
def _freqs(logits, params, n=20000):
    rows = logits.expand(n, -1).clone()
    tokens = sample(rows, [params] * n, [None] * n)
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
    mixed = sample(logits.expand(2, -1).clone(), [SamplingParams(temperature=0), SamplingParams(top_k=1)], [None, None])
    assert mixed.tolist() == [0, 0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    ps = prompts(6, seed=11, lo=3, hi=30)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([ps[0]], seeded)[0].token_ids
    batched = llm.generate(ps, [seeded] + [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)] * 5)
    assert batched[0].token_ids == alone
    other_seed = llm.generate([ps[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True))
    assert other_seed[0].token_ids != alone


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-6), dict(temperature=1.0, min_p=1.0),
])
def test_degenerate_filters_equal_greedy(llm, params):
    p = prompts(1, seed=12, lo=10, hi=11)[0]
    out = llm.generate([p], SamplingParams(max_tokens=10, ignore_eos=True, seed=3, **params))[0]
    assert out.token_ids == greedy_tokens(llm, p, 10)


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
