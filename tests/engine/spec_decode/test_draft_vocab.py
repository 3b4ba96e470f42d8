"""A draft vocabulary (speculative_config's draft_vocab_size): the subset head's logits, the subset
chosen from the frequency file, its errors, and lossless speculation with it (greedy output equals
plain decoding; sampled output follows the target's distribution, with q zero outside the subset)."""

from __future__ import annotations

import os

import pytest
import torch
from drafts import perturbed_copy
from tiny_models import SMALL_VOCAB, VOCAB, prompts, small_vocab_model
from token_stats import position_counts, tv, tv_bound
from transformers import AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.llm import LLM
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError
from engine.spec_decode.draft_sampler import sample_draft
from engine.spec_decode.draft_vocab import (
    FREQUENCY_FILE, SubsetLMHead, count_tokens, draft_vocab_ids, read_token_frequencies, restrict_lm_head,
    select_subset, write_token_frequencies,
)
from engine.spec_decode.rejection import processed_probs, rejection_sample
from kernels.gemv import SMALL_M

TARGET = "llama_gqa_untied"
MAX_TOKENS = (5, 17, 9, 30, 1, 12, 23, 2)


def _ids(ps: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in ps]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _frequencies(draft_dir: str, counts: torch.Tensor) -> str:
    path = os.path.join(draft_dir, FREQUENCY_FILE)
    if os.path.exists(path):
        os.remove(path)
    write_token_frequencies(path, counts)
    return draft_dir


def _spec(draft: str, size: int, k: int = 3, **kw) -> dict:
    return {"model": draft, "num_speculative_tokens": k, "draft_vocab_size": size, **kw}


# -- the head ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama_gqa_untied", "llama_mha_tied"])
def test_subset_head_logits_equal_the_full_heads_at_its_ids(model_dir, name):
    """The subset head's fp32 logits are the full head's at the subset's ids, -inf elsewhere; a tied
    embedding keeps every row; a decode forward through the runner gives the same."""
    runner = ModelRunner(EngineConfig(model=model_dir(name), device="cpu"))
    model = runner.model
    embed = model.model.embed_tokens.weight
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    full = model.compute_logits(hidden).float()
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:40].sort().values
    head = restrict_lm_head(model, ids)
    assert isinstance(model.lm_head, SubsetLMHead) and tuple(head.weight.shape) == (40, model.config.hidden_size)
    assert model.model.embed_tokens.weight is embed and embed.shape[0] == VOCAB
    sub = model.compute_logits(hidden)
    assert sub.dtype == torch.float32 and sub.shape == full.shape
    torch.testing.assert_close(sub[:, ids], full[:, ids])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(sub[:, outside]).all()
    assert torch.isin(sub.argmax(-1), ids).all()
    assert torch.equal(sub.argmax(-1), ids[full[:, ids].argmax(-1)])  # the argmax over the subset


def test_runner_with_lm_head_rows_decodes_only_subset_tokens(model_dir):
    """ModelRunner(lm_head_rows=...) restricts the head before its decode path runs: its greedy
    decode steps propose subset ids only."""
    path = model_dir(TARGET)
    ids = torch.arange(0, VOCAB, 3)
    runner = ModelRunner(EngineConfig(model=path, device="cpu"), lm_head_rows=ids)
    assert isinstance(runner.model.lm_head, SubsetLMHead)
    full = ModelRunner(EngineConfig(model=path, device="cpu"))
    torch.testing.assert_close(runner.model.lm_head.weight, full.model.lm_head.weight[ids])
    prompt = prompts(1, seed=9, lo=20, hi=21)[0]
    tokens = []
    for r in (runner, full):
        seq = Sequence(prompt, _greedy(4))
        seq.block_table = [0, 1]
        r.varlen_forward([(prompt[:-1], 0, seq.block_table)])  # the prompt's K/V but the last token's
        tokens.append(r.decode_steps([seq], 4)[0])
    assert torch.isin(torch.tensor(tokens[0]), ids).all()
    assert not torch.isin(torch.tensor(tokens[1]), ids).all()  # the full head would leave the subset


# -- the subset and the frequency file ------------------------------------------------------------------
def test_counts_round_trip_and_the_subset_takes_specials_then_the_most_frequent(tmp_path):
    counts = count_tokens([[5, 5, 7, 9, 9, 9], [7, 5, 11], []], 16)
    assert counts.tolist()[5] == 3 and counts[9] == 3 and counts[7] == 2 and counts[11] == 1
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\), got 3..16"):
        count_tokens([[3, 16]], 16)
    path = str(tmp_path / FREQUENCY_FILE)
    assert write_token_frequencies(path, counts) == 4
    assert open(path).read().splitlines() == ["5\t3", "9\t3", "7\t2", "11\t1"]  # ties by id
    assert torch.equal(read_token_frequencies(path, 16), counts)
    with pytest.raises(FileExistsError):  # nothing the user owns is overwritten
        write_token_frequencies(path, counts)
    assert select_subset(counts, 4, [0, 2]).tolist() == [0, 2, 5, 9]
    assert select_subset(counts, 4, [9]).tolist() == [5, 7, 9, 11]  # 9 is special: 5, 7, 11 next
    with pytest.raises(SpeculativeConfigError, match="needs 4 counted non-special tokens, but only 3"):
        select_subset(counts, 5, [9])


def _draft_dir(model_dir, tmp_path, lines: str | None, name: str = TARGET) -> str:
    """A copy (links) of a tiny model's files with the given frequency file (None: without one)."""
    src = model_dir(name, with_tokenizer=True)
    dst = tmp_path / "draft"
    dst.mkdir()
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), dst / name)
    if lines is not None:
        (dst / FREQUENCY_FILE).write_text(lines)
    return str(dst)


@pytest.mark.parametrize("value", [0, 1, True, "64", 64.0, -3])
def test_bad_draft_vocab_size_values_name_the_key(model_dir, value):
    with pytest.raises(SpeculativeConfigError) as err:
        SpeculativeConfig.from_dict(_spec(model_dir(TARGET, with_tokenizer=True), value))
    assert err.value.key == "draft_vocab_size" and "speculative_config.draft_vocab_size:" in str(err.value)


def test_draft_vocab_size_is_a_draft_model_key():
    with pytest.raises(SpeculativeConfigError, match=r"speculative_config\.draft_vocab_size: unknown key"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "draft_vocab_size": 64})


@pytest.mark.parametrize("lines,size,message", [
    (None, 64, "token_frequencies.tsv does not exist"),
    ("3 10\n", VOCAB + 1, "exceeds the vocabulary's 256"),
    ("3 10\n", 3, "does not leave room past the 3 special tokens"),
    ("3 10\n4\n", 4, r":2: expected 'token_id count'"),
    ("3 10\n4 x\n", 4, r":2: expected 'token_id count'"),
    ("3 -1\n", 4, r":1: expected 'token_id count'"),
    ("3 10\n256 1\n", 4, r":2: token id 256 is outside the vocabulary \[0, 256\)"),
    ("3 10\n3 1\n", 4, r":2: token id 3 is listed twice"),
    ("3 10\n4 2\n5 0\n", 6, "needs 3 counted non-special tokens, but only 2"),
])
def test_frequency_file_errors_name_the_key(model_dir, tmp_path, lines, size, message):
    """Checked at engine construction, before either model is built; the tiny tokenizer's special
    ids are its config's bos 1, eos 2, pad 0."""
    draft = _draft_dir(model_dir, tmp_path, lines)
    with pytest.raises(SpeculativeConfigError, match=message) as err:
        LLM(model_dir(TARGET, with_tokenizer=True), device="cpu", speculative_config=_spec(draft, size))
    assert err.value.key == "draft_vocab_size"


def test_subset_from_the_file_and_the_whole_vocabulary(model_dir, tmp_path):
    draft = _draft_dir(model_dir, tmp_path, "".join(f"{i} {1000 - i}\n" for i in range(3, 100)))
    hf = AutoConfig.from_pretrained(draft)
    spec = SpeculativeConfig.from_dict(_spec(draft, 10))
    assert draft_vocab_ids(spec, hf, None, {2}).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    spec = SpeculativeConfig.from_dict(_spec(draft, VOCAB))
    assert draft_vocab_ids(spec, hf, None, {2}) is None  # the whole vocabulary: the head stays


# -- lossless speculation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(model_dir) -> str:
    return model_dir(TARGET, with_tokenizer=True)


@pytest.fixture(scope="module")
def subset_drafts(target, tmp_path_factory) -> dict[str, str]:
    """The tests' poor and exact drafters, each with a frequency file whose top 128 tokens are a
    fixed random half of the vocabulary."""
    root = tmp_path_factory.mktemp("subset_drafts")
    counts = torch.randint(1, 1000, (VOCAB,), generator=torch.Generator().manual_seed(7))
    return {name: _frequencies(perturbed_copy(target, str(root / name), sigma), counts)
            for name, sigma in (("poor", 0.008), ("exact", 0.0))}


def _record_drafts(engine) -> list[int]:
    """Every token the engine's drafter proposes from now on."""
    proposer = engine.spec_worker.proposer
    seen: list[int] = []
    propose = proposer.propose

    def recording(seqs, k):
        proposal = propose(seqs, k)
        seen.extend(t for row in proposal.host_token_ids() for t in row)
        return proposal

    proposer.propose = recording
    return seen


@pytest.mark.parametrize("drafter", ["poor", "exact"])
def test_greedy_output_with_a_subset_drafter_equals_plain_decoding_in_a_ragged_batch(target, subset_drafts, drafter):
    ps = prompts(len(MAX_TOKENS), seed=3, lo=2, hi=40)
    params = [_greedy(m) for m in MAX_TOKENS]
    base = [o.token_ids for o in LLM(target, device="cpu").generate(_ids(ps), params)]
    llm = LLM(target, device="cpu", speculative_config=_spec(subset_drafts[drafter], 128))
    subset = llm.engine.draft_runner.model.lm_head.token_ids
    assert len(subset) == 128
    drafted = _record_drafts(llm.engine)
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out == base
    assert drafted and torch.isin(torch.tensor(drafted), subset).all()
    m = llm.engine.spec_metrics
    # Even the exact drafter loses the target's tokens outside the subset (about half of them).
    assert 0.05 < m.acceptance_rate < (0.9 if drafter == "poor" else 0.95), m.acceptance_rate
    in_subset = torch.isin(torch.tensor([t for o in base for t in o]), subset).float().mean().item()
    assert 0.3 < in_subset < 0.7


def test_mixed_greedy_and_sampled_rows_with_a_subset_drafter(target, subset_drafts):
    """Sampled rows run the sampled draft path (q kept, zero outside the subset) beside greedy rows,
    which still equal plain decoding."""
    ps = prompts(4, seed=4, lo=3, hi=30)
    params = [_greedy(10), SamplingParams(temperature=0.9, max_tokens=11, seed=5), _greedy(14),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=9, seed=6)]
    plain = [o.token_ids for o in LLM(target, device="cpu").generate(_ids(ps), params)]
    llm = LLM(target, device="cpu", speculative_config=_spec(subset_drafts["poor"], 128))
    drafted = _record_drafts(llm.engine)
    out = [o.token_ids for o in llm.generate(_ids(ps), params)]
    assert out[0] == plain[0] and out[2] == plain[2]
    assert [len(o) for o in out] == [10, 11, 14, 9]
    assert torch.isin(torch.tensor(drafted), llm.engine.draft_runner.model.lm_head.token_ids).all()


# -- the sampled distribution is the target's ------------------------------------------------------------
K, ROWS, V, SUBSET = 3, 20_000, 24, 14


def _subset_setup(seed: int = 0):
    """Target p over V tokens; a draft whose head keeps SUBSET of them, its logits the target's
    plus noise (lower on the subset); drafts sampled with sample_draft, q as it returns it."""
    g = torch.Generator().manual_seed(seed)
    target_logits = 1.5 * torch.randn(K + 1, V, generator=g)
    ids = torch.randperm(V, generator=g)[:SUBSET].sort().values
    weight = torch.randn(V, V, generator=g)
    head = SubsetLMHead(weight, ids, V)
    wanted = target_logits[:K] + 1.5 * torch.randn(K, V, generator=g)
    wanted[:, ids] -= 2.0  # the whole head would put most of its mass outside the subset
    hidden = torch.linalg.solve(weight, wanted.T).T  # hidden @ weight.T = wanted
    logits = head(hidden)  # [K, V], -inf outside the subset
    params = [SamplingParams(temperature=1.0)] * ROWS
    torch.manual_seed(seed)
    draws = [sample_draft(logits[j].expand(ROWS, V), params) for j in range(K)]
    draft = torch.stack([t for t, _ in draws], dim=1)
    q = torch.stack([qj[0] for _, qj in draws])  # [K, V]: every row's q_j is the same
    full_q = (hidden @ weight.T).softmax(-1)  # the draft's distribution were its head whole
    return target_logits.softmax(-1), q, full_q, draft, ids


def test_subset_q_is_the_softmax_over_the_subset_and_zero_outside():
    p, q, full_q, draft, ids = _subset_setup()
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    assert (q[:, outside] == 0).all() and torch.isin(draft, ids).all()
    torch.testing.assert_close(q[:, ids], full_q[:, ids] / full_q[:, ids].sum(-1, keepdim=True))
    torch.testing.assert_close(q, processed_probs(torch.log(q)[None], [SamplingParams(temperature=1.0)])[0])


@pytest.mark.parametrize("which,correct", [("subset_q", True), ("full_q", False)])
def test_rejection_with_the_subset_q_emits_the_target_distribution(which, correct):
    """Every emitted token at position j is distributed as p_j when the verify reads the subset q
    the drafts were sampled from; reading the draft's unrestricted softmax instead (a q that is not
    the one sampled) is detected at position 0. Fixed seeds: at position 0 the right q lands at TV
    0.011 against a bound of 0.036, the whole head's softmax at 0.156."""
    p, q, full_q, draft, _ = _subset_setup()
    num_draft = torch.full((ROWS,), K)
    num_draft[ROWS // 2 :] = torch.randint(0, K + 1, (ROWS - ROWS // 2,), generator=torch.Generator().manual_seed(3))
    used = q if which == "subset_q" else full_q
    torch.manual_seed(1)
    out = rejection_sample(draft, num_draft, p.expand(ROWS, -1, -1), used.expand(ROWS, -1, -1)).to_lists()
    dists = []
    for j in range(K + 1):
        counts = position_counts(out, j, V)
        n = int(counts.sum())
        assert n >= 200, (j, n)  # enough samples for the bound to mean something
        dists.append((tv(counts, p[j]), tv_bound(n, V)))
    if correct:
        assert all(d <= b for d, b in dists), dists
    else:
        assert dists[0][0] > 3 * dists[0][1], dists[0]


def test_engine_sampling_with_a_subset_drafter_follows_the_target_distribution(tmp_path):
    """Output tokens 1 and 2 (from speculative steps whose drafter proposes 6 of 12 tokens) against
    the target's exact marginals, within the TV bound; the drafter's proposals stay in its subset."""
    target = small_vocab_model(tmp_path / "target", 0)
    draft = _frequencies(small_vocab_model(tmp_path / "draft", 1), torch.arange(SMALL_VOCAB, 0, -1))
    prompt, n, temp = [3, 7, 1], 3000, 0.8
    llm = LLM(target, device="cpu", max_num_seqs=n, max_model_len=16,
              speculative_config=_spec(draft, 6, k=2, max_batch_size=n))
    assert llm.engine.draft_runner.model.lm_head.token_ids.tolist() == [0, 1, 2, 3, 4, 5]
    drafted = _record_drafts(llm.engine)
    out = llm.generate(_ids([prompt] * n), SamplingParams(temperature=temp, max_tokens=3))
    assert llm.engine.num_spec_steps > 0 and 0 < llm.engine.spec_metrics.acceptance_rate < 1
    assert drafted and max(drafted) < 6
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def probs(prefixes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (model(prefixes).logits[:, -1] / temp).softmax(-1)

    p0 = probs(torch.tensor([prompt]))[0]
    p1_given = probs(torch.tensor([prompt + [t] for t in range(SMALL_VOCAB)]))
    p1 = p0 @ p1_given
    seq2 = torch.tensor([prompt + [a, b] for a in range(SMALL_VOCAB) for b in range(SMALL_VOCAB)])
    p2 = (p0[:, None] * p1_given).reshape(-1) @ probs(seq2)
    tokens = torch.tensor([o.token_ids for o in out])
    bound = tv_bound(n, SMALL_VOCAB)
    assert (p1[6:].sum() > 0.2) and (p2[6:].sum() > 0.2)  # the target often emits tokens the draft cannot
    for j, p in ((1, p1), (2, p2)):
        counts = torch.bincount(tokens[:, j], minlength=SMALL_VOCAB).float()
        assert tv(counts, p) < bound, (j, tv(counts, p), bound)


# -- the GPU: the draft's CUDA graphs (decode, multi-step greedy, prefill) and Triton kernels ------------
@pytest.mark.gpu
def test_fp32_graphs_greedy_with_a_subset_drafter_matches_transformers(model_dir, mixed_prompts, hf_reference,
                                                                       tmp_path):
    counts = torch.randint(1, 1000, (VOCAB,), generator=torch.Generator().manual_seed(7))
    draft = _draft_dir(model_dir, tmp_path, "".join(f"{i} {c}\n" for i, c in enumerate(counts.tolist())),
                       "llama_mha_tied")
    llm = LLM(model_dir(TARGET, with_tokenizer=True), device="cuda", dtype="float32", max_model_len=256, block_size=4,
              num_kv_blocks=96, max_num_batched_tokens=128, cuda_graph_max_bs=32,
              speculative_config=_spec(draft, 128, k=4, max_batch_size=32))
    engine = llm.engine
    assert engine.draft_runner.graphs is not None and isinstance(engine.draft_runner.model.lm_head, SubsetLMHead)
    drafted = _record_drafts(engine)
    outs = llm.generate(mixed_prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_reference(TARGET, mixed_prompts)
    subset = engine.draft_runner.model.lm_head.token_ids.cpu()
    assert engine.num_spec_steps > 0 and torch.isin(torch.tensor(drafted), subset).all()


@pytest.mark.gpu
def test_bf16_sampled_rows_with_a_subset_drafter_repeat_and_stay_in_the_subset(model_dir, mixed_prompts, tmp_path):
    draft = _draft_dir(model_dir, tmp_path, "".join(f"{i} {300 - i}\n" for i in range(200)), "llama_mha_tied")
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=i) if i % 2 else _greedy(20)
              for i in range(8)]
    # fused_decode_rows pinned: each engine would time it apart (bf16 tokens need one path).
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256, kv_cache_tokens=8192,
              speculative_config=_spec(draft, 64), fused_decode_rows=SMALL_M)
    runs = []
    for _ in range(2):
        llm = LLM(model_dir(TARGET, with_tokenizer=True), **kw)
        drafted = _record_drafts(llm.engine)
        runs.append([o.token_ids for o in llm.generate(mixed_prompts[:8], params)])
        assert drafted and max(drafted) < 64  # the subset: specials 0-2 and ids 3..63
    assert runs[0] == runs[1] and all(len(r) == 20 for r in runs[0])
