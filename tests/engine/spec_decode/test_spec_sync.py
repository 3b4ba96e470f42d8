"""A speculative round waits for the device once: the draft hands its tokens to the verify forward
on the device, and the only transfer to the host is the verify's emitted tokens (plus the logprobs
of the sequences that asked). On the CPU, every tensor read by the host inside a speculative step
is counted; on a GPU (marked gpu), CUDA's sync debug mode counts the synchronizing calls."""

from __future__ import annotations

import warnings

import pytest
import torch
from drafts import medusa_heads
from tiny_models import prompts

from engine import LLM, SamplingParams
from kernels import paged_attention

HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _spec(drafter: str, model_dir, tmp_path) -> dict:
    if drafter == "ngram":
        return NGRAM
    if drafter == "medusa":  # random heads: the features kept and gathered on the device as well
        target = model_dir("llama_gqa_untied", with_tokenizer=True)
        return {"method": "medusa", "model": medusa_heads(target, str(tmp_path / "heads"), 3, 0.05),
                "num_speculative_tokens": 3}
    return {"model": model_dir("llama_mha_tied", with_tokenizer=True), "num_speculative_tokens": 3}


def _requests(greedy_only: bool) -> tuple[list[dict], list[SamplingParams]]:
    ps = prompts(4, seed=21, lo=6, hi=30)
    ps = [p + p[: len(p) // 2] for p in ps]  # repeats, for the n-gram lookups
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True) if greedy_only or i % 2 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=i, ignore_eos=True) for i in range(4)]
    return [{"prompt_token_ids": p} for p in ps], params


@pytest.mark.parametrize("drafter,greedy_only", [("model", True), ("model", False), ("ngram", False),
                                                 ("medusa", True), ("medusa", False)])
def test_a_speculative_round_reads_the_device_once(model_dir, monkeypatch, tmp_path, drafter, greedy_only):
    """One host read per round (VerifiedTokens.to_lists, or a plain step's sampled tokens when the
    n-gram found nothing): the greedy draft (multi-step graphs), the sampled draft (tokens fed back
    on the device) and the verify add none."""
    llm = LLM(model_dir("llama_gqa_untied", with_tokenizer=True), device="cpu",
              speculative_config=_spec(drafter, model_dir, tmp_path))
    worker = llm.engine.spec_worker
    reads: list[str] | None = None
    in_cpu_attention = False
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if reads is not None and not in_cpu_attention:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    # The CPU decode attention reference reads its context lengths to trim the block tables (a CPU-only
    # step: on a GPU the Triton kernel runs and reads nothing on the host); its reads are not syncs.
    cpu_attention = paged_attention.paged_decode_attention_ref

    def uncounted(*args, **kwargs):
        nonlocal in_cpu_attention
        in_cpu_attention = True
        try:
            return cpu_attention(*args, **kwargs)
        finally:
            in_cpu_attention = False

    monkeypatch.setattr(paged_attention, "paged_decode_attention_ref", uncounted)
    per_step: list[list[str]] = []
    step = worker.step

    def counted_step(batch):
        nonlocal reads
        reads = []
        try:
            return step(batch)
        finally:
            per_step.append(reads)
            reads = None

    monkeypatch.setattr(worker, "step", counted_step)
    requests, params = _requests(greedy_only)
    outs = llm.generate(requests, params)
    assert all(len(o.token_ids) == 12 for o in outs)
    assert len(per_step) == llm.engine.num_spec_steps > 0
    assert worker.metrics.num_proposed > 0
    assert per_step == [["tolist"]] * len(per_step)


@pytest.mark.gpu
@pytest.mark.parametrize("drafter,greedy_only", [("model", True), ("model", False), ("ngram", False),
                                                 ("medusa", True), ("medusa", False)])
def test_a_speculative_round_syncs_once_on_the_gpu(model_dir, monkeypatch, tmp_path, drafter, greedy_only):
    """In CUDA graphs (bf16): a round's synchronizing calls, as CUDA's sync debug mode reports them."""
    llm = LLM(model_dir("llama_gqa_untied", with_tokenizer=True), device="cuda", dtype="bfloat16",
              max_model_len=256, kv_cache_tokens=8192, speculative_config=_spec(drafter, model_dir, tmp_path))
    worker = llm.engine.spec_worker
    assert llm.engine.runner.graphs is not None and llm.engine.runner.verify_paths.max_pseudo_rows == 16
    per_step: list[int] = []
    step = worker.step

    def counted_step(batch):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                per_step.append(sum("synchroniz" in str(w.message) for w in caught))

    monkeypatch.setattr(worker, "step", counted_step)
    requests, params = _requests(greedy_only)
    outs = llm.generate(requests, params)
    assert all(len(o.token_ids) == 12 for o in outs)
    assert len(per_step) == llm.engine.num_spec_steps > 0
    assert per_step == [1] * len(per_step)
