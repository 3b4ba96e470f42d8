"""The verify forward with multi-query decode attention (Context.verify_query_len, the runner's
_mq verify paths), CPU fp32 with the torch reference attention: the same logits as the prefill
verify path, in both layouts (varlen prefill forward, decode pseudo-rows grouped by sequence), and
a speculative engine forced through them gives the plain greedy output."""

from __future__ import annotations

import torch
from tiny_models import prompts
from verify_batch import CONTEXTS, verify_chunks, verify_runner

from engine import LLM, SamplingParams
from kernels import verify_attention


def uniform_chunks() -> list[tuple[list[int], int, list[int]]]:
    """CONTEXTS' sequences, each verifying k + 1 = 5 tokens (their blocks hold them)."""
    return [([60 + 5 * i + j for j in range(5)], len(ctx), table) for i, (ctx, _, table) in enumerate(CONTEXTS)]


def test_multi_query_verify_paths_give_the_prefill_verify_logits(model_dir, monkeypatch):
    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    paths = runner.verify_paths
    layouts = []  # varlen or not, per multi-query attention call
    ref_attention = verify_attention.paged_verify_attention_ref
    monkeypatch.setattr(verify_attention, "paged_verify_attention_ref",
                        lambda *a: layouts.append(a[-1] is not None) or ref_attention(*a))
    with torch.inference_mode():
        for chunks in (verify_chunks(), uniform_chunks()):
            ref = paths.prefill_all_logits(chunks).clone()
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(paths.prefill_all_logits(chunks, multi_query=True), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(paths.pseudo_row_logits(chunks, multi_query=True), ref, rtol=1e-5, atol=1e-5)
    layers = runner.model.config.num_hidden_layers
    assert layouts == [True] * 2 * layers + [False] * layers


def test_speculative_greedy_through_multi_query_paths_equals_plain_greedy(model_dir):
    """A target drafting for itself (every draft accepted; ragged near max_tokens, where drafts
    shrink): full batches through pseudo_rows_mq, ragged ones through prefill_mq."""
    path = model_dir("llama_gqa_untied")
    kw = dict(device="cpu", dtype="float32", max_model_len=64, block_size=4, enable_prefix_caching=False)
    ps = prompts(3, seed=5, lo=3, hi=11)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 14, 11)]
    base = [o.token_ids for o in LLM(path, **kw).generate([{"prompt_token_ids": p} for p in ps], params)]
    llm = LLM(path, **kw, speculative_config={"model": path, "num_speculative_tokens": 3})
    runner = llm.engine.runner
    runner.verify_paths.path = {n: "pseudo_rows_mq" for n in range(2, 17)}
    runner.verify_paths.ragged = {n: "prefill_mq" for n in range(2, 17)}
    taken = []
    for name in ("pseudo_row_logits", "prefill_all_logits"):
        real = getattr(runner.verify_paths, name)
        setattr(runner.verify_paths, name, lambda c, ids=None, multi_query=False, real=real, name=name:
                taken.append((name, multi_query)) or real(c, ids, multi_query))
    out = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], params)]
    assert out == base
    assert set(taken) == {("pseudo_row_logits", True), ("prefill_all_logits", True)}
    assert llm.engine.spec_metrics.acceptance_rate == 1.0
