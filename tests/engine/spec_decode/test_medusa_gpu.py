"""Medusa on the GPU: the verify graphs' hidden outputs (every graphed path), greedy output equal to
transformers' through each path with preemption and rollback, bf16 mixed batches, the auto policy's
measured heads."""

from __future__ import annotations

import pytest
import torch
from drafts import fitted_medusa_heads
from tiny_models import NEW_TOKENS

from engine import LLM, SamplingParams
from kernels.gemv import SMALL_M

pytestmark = pytest.mark.gpu
TARGET = "llama_gqa_untied"
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
GRAPHED = dict(device="cuda", dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=96,
               max_num_batched_tokens=128, cuda_graph_max_bs=32)


@pytest.fixture(scope="module")
def heads(model_dir, mixed_prompts, tmp_path_factory) -> str:
    """Heads fitted briefly to the target's continuations of the prompts: right part of the time."""
    target = model_dir(TARGET, with_tokenizer=True)
    return fitted_medusa_heads(target, str(tmp_path_factory.mktemp("medusa") / "h"), mixed_prompts, 4,
                               new_tokens=NEW_TOKENS + 4, steps=60)


def _spec(heads: str, **kw) -> dict:
    return {"method": "medusa", "model": heads, "num_speculative_tokens": 4, "max_batch_size": 32, **kw}


@pytest.mark.parametrize("path", [None, "pseudo_rows", "pseudo_rows_mq", "prefill", "prefill_mq"])
def test_fp32_graphs_greedy_with_medusa_matches_transformers(path, heads, model_dir, mixed_prompts, hf_reference):
    """A tiny pool (preemption, chunking, rollback); every verify through one graphed path (None:
    as timed at startup; ragged batches, always there after a prefill, through prefill_mq where
    pseudo_rows_mq is forced), each giving its hidden rows from its graph's second output."""
    llm = LLM(model_dir(TARGET, with_tokenizer=True), **GRAPHED, speculative_config=_spec(heads))
    engine = llm.engine
    paths = engine.runner.verify_paths
    assert paths.verify_graphs is not None and paths.mq_graphs is not None and paths.mq_verify_graphs is not None
    if path is not None:
        paths.path = {n: path for n in range(17)} | {0: "prefill_mq" if path.endswith("mq") else "prefill"}
        paths.ragged = {n: "prefill_mq" for n in range(17)}
    replays = []
    for graphs in (engine.runner.graphs, paths.mq_graphs):
        real = graphs.forward
        graphs.forward = lambda n, hidden=False, real=real: replays.append(hidden) or real(n, hidden)
    for graphs in (paths.verify_graphs, paths.mq_verify_graphs):
        real = graphs.run
        graphs.run = lambda c, ids=None, hidden=False, real=real: replays.append(hidden) or real(c, ids, hidden)
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference(TARGET, mixed_prompts)
    m = engine.spec_metrics
    assert engine.num_spec_steps > 0 and m.num_accepted > 0 and engine.scheduler.num_preemptions > 0
    assert any(replays)  # verifies replayed graphs for their hidden rows


@pytest.mark.parametrize("path", ["pseudo_rows", "pseudo_rows_mq", "prefill", "prefill_mq"])
def test_each_verify_graph_gives_the_eager_hidden_rows(path, heads, model_dir):
    """Graph replay against the eager forward of the same chunks: logits and hidden rows, row for row."""
    llm = LLM(model_dir(TARGET, with_tokenizer=True), **GRAPHED, speculative_config=_spec(heads))
    runner = llm.engine.runner
    paths = runner.verify_paths
    contexts = [(list(range(3, 3 + 9 + 4 * i)), [8 * i + j for j in range(8)]) for i in range(3)]  # own blocks
    with torch.inference_mode():
        runner.varlen_forward([(ctx, 0, table) for ctx, table in contexts])
        chunks = [([5, 6, 7, 8, 9], len(ctx), table) for ctx, table in contexts]
        logits, hidden = (t.clone() for t in paths.forwards()[path](chunks, None, hidden=True))
        eager = runner.varlen_forward(chunks)
        eager_logits = runner.model.compute_logits(eager).float()
    torch.testing.assert_close(hidden, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_bf16_mixed_batch_runs_and_seeded_sampling_repeats(heads, model_dir, mixed_prompts):
    target = model_dir(TARGET, with_tokenizer=True)
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=i, logprobs=1 if i % 3 == 0 else None)
              if i % 2 else SamplingParams(temperature=0.0, max_tokens=20) for i in range(8)]
    # fused_decode_rows pinned: each engine would time it apart (bf16 tokens need one path).
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256, kv_cache_tokens=8192,
              speculative_config=_spec(heads, num_speculative_tokens=3), fused_decode_rows=SMALL_M)
    a = LLM(target, **kw).generate(mixed_prompts[:8], params)
    b = LLM(target, **kw).generate(mixed_prompts[:8], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.error is None and len(o.token_ids) > 0 for o in a)


def test_auto_policy_measures_the_heads_with_graphs_and_keeps_greedy_output(heads, model_dir, mixed_prompts,
                                                                          hf_reference):
    llm = LLM(model_dir(TARGET, with_tokenizer=True), **GRAPHED,
              speculative_config=_spec(heads, num_speculative_tokens_per_batch_size="auto"))
    engine = llm.engine
    costs = engine.spec_worker.policy.costs
    assert costs.batch_sizes == engine.runner.graphs.buckets == [1, 2, 4, 8, 16, 32]
    assert not costs.catch_up and all(t > 0 for row in costs.draft.values() for t in row)
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference(TARGET, mixed_prompts)
    assert sum(engine.stats()["spec_decode"]["policy"]["steps_by_k"]) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphed_greedy_drafts_equal_the_eager_ones(dtype, heads, model_dir):
    """MedusaGraphs (per batch bucket and k: heads, LM head, argmax) against the eager draft of the
    same features, at batch sizes inside and between the buckets: each graphed token is the eager
    argmax, up to a near-tie of the eager logits (a bucket's matmuls may take another kernel than n
    rows': 1e-4 in fp32, two bf16 ulps of the largest logit in bf16); sampled rows and rows below
    min_tokens take the eager path."""
    from engine.sequence import Sequence

    llm = LLM(model_dir(TARGET, with_tokenizer=True), device="cuda", dtype=dtype, max_model_len=256,
              kv_cache_tokens=8192, speculative_config=_spec(heads, max_batch_size=16))
    proposer = llm.engine.spec_worker.proposer
    graphs = proposer.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8, 16] and len(graphs.graphs) == 5 * 4
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 3, 8, 13, 16):
        feats = torch.randn(n, 64, device="cuda", generator=g).to(proposer.runner.dtype)
        seqs = [Sequence([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8)) for _ in range(n)]
        for i, seq in enumerate(seqs):
            seq.spec_feature = (feats, i, len(seq))
        for k in (1, 2, 4):
            assert graphs.takes(seqs, k)
            with torch.inference_mode():
                logits = proposer.logits(feats, k).float()
            proposal = proposer.propose(seqs, k)
            assert proposal.ids.shape == (n, k) and proposal.counts == [k] * n
            best = logits.max(dim=-1).values
            chosen = logits.gather(-1, proposal.ids[..., None]).squeeze(-1)
            tol = 1e-4 if dtype == "float32" else 2 * 2**-7 * best.abs().max().item()
            assert (best - chosen).max().item() <= tol
            assert (proposal.ids == logits.argmax(dim=-1)).float().mean().item() > 0.9
    sampled = [Sequence([1, 2, 3], SamplingParams(temperature=0.8, max_tokens=8))]
    early = [Sequence([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=2))]
    assert not graphs.takes(sampled, 2) and not graphs.takes(early, 2)
    assert not graphs.takes(seqs + seqs, 2)  # past the largest bucket
