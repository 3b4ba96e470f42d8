"""Batch-invariant mode (EngineConfig.batch_invariant) with the engine's Triton kernels, interpreted on
the CPU: speculative greedy output equals plain greedy output on a target whose LM head is full of
near-ties (pairs of vocabulary rows equal to 1e-7), in a ragged batch; decode attention of a query
equals its verify (pseudo-row) attention bitwise; the verify runs as pseudo-rows only, in groups when
it outgrows the decode rows; bad combinations are refused by name.

Interpreted, tl.dot is numpy's (its bf16 dots unusable: fp32 here), whose BLAS sums rows of a tile in
different orders: the tests run with row_invariant_dot's substitute, a dot that sums every element
alike as a GPU's does. Equality on the CPU is necessary, not sufficient;
tests/engine/spec_decode/test_batch_invariant_gpu.py runs the mode in bf16 graphs on a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "spec_decode"))
from drafts import perturbed_copy  # noqa: E402
from tiny_models import make_model_dir, prompts  # noqa: E402

from row_invariant_dot import row_invariant_dot  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from kernels import paged_attention  # noqa: E402

MAX_TOKENS = (9, 14, 6, 12)


def near_tie_target(root: str) -> str:
    """A tiny untied Llama whose LM-head rows come in pairs equal to ~1e-7: at every step the top two
    logits may be such a pair, so the argmax rests on the last bits of the logits."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(root, "near_tie")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    src = make_model_dir("llama_gqa_untied", root, seed=7, with_tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.lm_head.weight
        w[1::2] = w[0::2] * (1 + 1e-7 * torch.randn(w[0::2].shape[0], 1, generator=g))
    model.save_pretrained(path)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.link(os.path.join(src, name), os.path.join(path, name))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("batch_invariant"))
    target = near_tie_target(root)
    return target, perturbed_copy(target, os.path.join(root, "draft"), 0.02)


@pytest.fixture(autouse=True)
def one_thread_rows_summed_alike():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with row_invariant_dot():
        yield
    torch.set_num_threads(threads)


def _kw(**extra) -> dict:
    return {**dict(device="cpu", dtype="float32", use_triton=True, batch_invariant=True, max_model_len=64,
                   block_size=4, enable_prefix_caching=False, num_decode_steps=1), **extra}


def _generate(target: str, **kw) -> tuple[list[list[int]], LLM]:
    ps = prompts(len(MAX_TOKENS), seed=8, lo=2, hi=20)
    llm = LLM(target, **_kw(**kw))
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], params)], llm


@pytest.fixture(scope="module")
def speculative_run(models):
    """The speculative greedy run both tests below compare with a plain one (the same engine, prompts
    and settings in each; run once: it is the longest part of either), with what it recorded: the
    tokens, its spec metrics, each verify's (rows, multi-query) through the pseudo-rows and the number
    of chunks of each pseudo-row prefill (the target's and the draft's)."""
    import engine.model_runner as model_runner

    target, draft = models
    verify_rows: list[tuple[int, bool]] = []
    prefills: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, row_invariant_dot():
            real_prefill = model_runner.ModelRunner._prefill_as_pseudo_rows
            mp.setattr(model_runner.ModelRunner, "_prefill_as_pseudo_rows",
                       lambda self, chunks: prefills.append(len(chunks)) or real_prefill(self, chunks))
            spec_llm = LLM(target, **_kw(speculative_config={"model": draft, "num_speculative_tokens": 3}))
            paths = spec_llm.engine.runner.verify_paths
            real = paths.pseudo_row_logits
            mp.setattr(paths, "pseudo_row_logits", lambda chunks, ids=None, multi_query=False: verify_rows.append(
                (sum(len(c[0]) for c in chunks), multi_query)) or real(chunks, ids, multi_query))
            ps = prompts(len(MAX_TOKENS), seed=8, lo=2, hi=20)
            params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
            spec = [o.token_ids for o in spec_llm.generate([{"prompt_token_ids": p} for p in ps], params)]
    finally:
        torch.set_num_threads(threads)
    return spec, spec_llm.engine.spec_metrics, verify_rows, prefills


def test_speculative_greedy_equals_plain_greedy_in_a_ragged_batch(models, speculative_run):
    target, _ = models
    plain, _ = _generate(target)
    spec, m, verify_rows, _ = speculative_run
    assert spec == plain
    assert 0 < m.num_accepted < m.num_proposed  # drafts accepted and rejected
    # Every verify went through the decode path's pseudo-rows, ragged batches included (no timing, no mq).
    assert verify_rows and all(not mq for _, mq in verify_rows) and len({n for n, _ in verify_rows}) > 1


def test_prefill_batching_and_chunking_do_not_change_the_output(models, speculative_run, monkeypatch):
    """Prefill runs as decode pseudo-rows in the mode: a plain run whose prompts are chunked over steps
    of 8 tokens (other prefill batches, pieces of other lengths) gives the tokens of a speculative run
    that prefills them all in one step; prompt logprobs come from the same rows."""
    import engine.model_runner as model_runner

    target, _ = models
    prefills: list[int] = []
    real = model_runner.ModelRunner._prefill_as_pseudo_rows
    monkeypatch.setattr(model_runner.ModelRunner, "_prefill_as_pseudo_rows",
                        lambda self, chunks: prefills.append(len(chunks)) or real(self, chunks))
    chunked, _ = _generate(target, max_num_batched_tokens=8)
    spec, _, _, spec_prefills = speculative_run
    assert spec == chunked
    assert len(prefills) > 4 and spec_prefills  # chunked over many steps; the speculative run's own prefills
    ps = prompts(2, seed=8, lo=5, hi=12)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    outs = [LLM(target, **_kw(max_num_batched_tokens=b)).generate([{"prompt_token_ids": p} for p in ps], params)
            for b in (4, 64)]
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        assert [e and {t: lp.logprob for t, lp in e.items()} for e in a.prompt_logprobs] == \
            [e and {t: lp.logprob for t, lp in e.items()} for e in b.prompt_logprobs]


def test_prompt_logprob_requests_take_no_cached_entries_in_the_mode(models):
    """The mode's pseudo-row prefill keeps no hidden state after a block, which a prompt-logprob hit
    would score its first computed position from (a stale zero row): in the mode no block keeps
    prompt logprobs, so a second request sharing the prefix recomputes it, exactly."""
    target, _ = models
    prefix = prompts(1, seed=3, lo=14, hi=15)[0]
    ps = [prefix + [5, 6], prefix + [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    warm = LLM(target, **_kw(enable_prefix_caching=True))
    outs = [warm.generate([{"prompt_token_ids": p}], params)[0] for p in ps]
    cold = LLM(target, **_kw()).generate([{"prompt_token_ids": p} for p in ps], params)
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    for a, b in zip(outs, cold):
        assert a.token_ids == b.token_ids
        assert [e and {t: lp.logprob for t, lp in e.items()} for e in a.prompt_logprobs] == \
            [e and {t: lp.logprob for t, lp in e.items()} for e in b.prompt_logprobs]
    plain = warm.generate([{"prompt_token_ids": ps[1]}], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert plain.num_cached_tokens > 0, "requests without prompt logprobs still hit"


def test_a_verify_larger_than_the_decode_rows_runs_in_groups(models):
    """Two sequences allowed, four speculative tokens: the decode rows hold a verify of 10 tokens. With
    fewer rows it runs in several forwards, of whole sequences (6 rows) or of pieces of them (3 rows:
    a row then reads K/V an earlier forward stored), giving the logits of one forward over them all."""
    target, draft = models
    llm = LLM(target, **_kw(max_num_seqs=2, speculative_config={"model": draft, "num_speculative_tokens": 4,
                                                                "max_batch_size": 2}))
    paths = llm.engine.runner.verify_paths
    assert paths.max_pseudo_rows == 10  # decode rows sized for the largest verify
    ps = prompts(2, seed=9, lo=4, hi=10)
    llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0.0, max_tokens=1))
    seqs = [([5, 6, 7, 8, 9], len(p), list(range(i * 8, i * 8 + 8))) for i, p in enumerate(ps)]
    # The rows attend to their context in blocks the prompts above may not have written (the pool is
    # torch.empty: a NaN there made torch.equal fail now and then): a finite context in every block.
    g = torch.Generator().manual_seed(0)
    for layer in llm.engine.runner.attn_layers:
        for cache in (layer.k_cache, layer.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=g, dtype=torch.float32).to(cache.dtype))
    with torch.inference_mode():
        whole = paths.pseudo_row_logits(seqs).clone()
        for rows in (6, 3):
            paths.max_pseudo_rows = rows
            assert torch.equal(paths.pseudo_row_logits(seqs), whole), rows
    assert whole.shape == (10, 256)


def test_decode_attention_of_a_query_equals_its_verify_attention(models):
    """The split count is batch 1's at every batch in the mode: a query attends the same as a decode
    row alone and as one of a verify's pseudo-rows (other rows, other context lengths beside it)."""
    target, _ = models
    llm = LLM(target, **_kw(max_model_len=512, block_size=16))
    attn = llm.engine.runner.attn_layers[0]
    assert attn.decode_splits(1) == attn.decode_splits(7) == attn.decode_splits(100) > 1  # 1 at 100 without the mode
    g = torch.Generator().manual_seed(3)
    kv_heads, dim, blocks = attn.num_kv_heads, attn.head_dim, 32
    k_cache = torch.randn(blocks, 16, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks, 16, kv_heads, dim, generator=g)
    # One sequence's 5 verify rows, then two other sequences.
    lens = torch.tensor([300, 301, 302, 303, 304, 17, 200], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:32] for _ in range(7)]).to(torch.int32)
    tables[1:5] = tables[0]
    q = torch.randn(7, attn.num_heads, dim, generator=g)

    def decode(rows: slice) -> torch.Tensor:
        return paged_attention.paged_decode_attention(q[rows], k_cache, v_cache, tables[rows], lens[rows], attn.scale,
                                                      num_splits=attn.decode_splits(rows.stop - rows.start),
                                                      partition=128, pdl=False)

    together = decode(slice(0, 7))
    for i in range(7):
        assert torch.equal(decode(slice(i, i + 1)), together[i : i + 1]), i


@pytest.mark.parametrize("bad,match", [
    (dict(use_triton=False), "Triton"),
    (dict(fused_decode=False), "fused_decode"),
    (dict(int4_kernel="tinygemm"), "tinygemm"),
])
def test_bad_combinations_are_refused_by_name(models, bad, match):
    target, _ = models
    with pytest.raises(ValueError, match=f"batch_invariant: .*{match}"):
        EngineConfig(model=target, **{**_kw(), **bad})
    with pytest.raises(ValueError, match="batch_invariant: must be True or False"):
        EngineConfig(model=target, **{**_kw(), "batch_invariant": "yes"})


def test_options_reach_the_model(models):
    target, _ = models
    options = EngineConfig(model=target, **_kw(int4_kernel="auto")).model_options()
    assert options.batch_invariant and options.exact_dequant and options.int4_kernel == "triton"


def test_bench_script_reports_equal_outputs_in_the_mode(models, tmp_path):
    """experiments/batch_invariant_bench.py end to end on the tiny target (interpreted): its
    forward timings name the pseudo-row path in the mode, and its speculative check is equal there."""
    import json

    from support import load_experiment

    target, _ = models
    out = tmp_path / "rows.jsonl"
    load_experiment("batch_invariant_bench").main([
        "--model", target, "--batch", "2", "--k", "2", "--context", "8", "--new-tokens", "3", "--prompts", "2",
        "--repeat", "1", "--only", "forward", "spec_equal", "--json", str(out),
        "--engine", '{"device": "cpu", "dtype": "float32", "use_triton": true, "block_size": 4}'])
    rows = {(r["bench"], r["batch_invariant"]): r for r in map(json.loads, out.read_text().splitlines())}
    benches = ("batch_invariant_forward", "batch_invariant_spec_equal")
    assert set(rows) == {(b, m) for b in benches for m in (False, True)}
    assert all("error" not in r for r in rows.values())
    assert rows["batch_invariant_forward", True]["verify_path"] == "pseudo_rows"
    assert rows["batch_invariant_forward", True]["verify_forward_us"] > 0
    equal = rows["batch_invariant_spec_equal", True]
    assert equal["greedy_equal"] is True and equal["acceptance_rate"] == 1.0  # the target drafting for itself
