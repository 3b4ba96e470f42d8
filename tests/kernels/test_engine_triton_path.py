"""The engine with its Triton kernels switched on (interpreted on CPU) gives transformers' tokens.

Decode batches of <= kernels.gemv.SMALL_M sequences take the fused decode path (norms, residual
adds and SwiGLU inside the skinny-GEMM launches) unless fused_decode is off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import hf_greedy, make_model_dir, prompts  # noqa: E402

import engine.models.llama as llama_module  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("prefill", ["sdpa", "triton"])
def test_engine_greedy_with_triton_kernels(tmp_path, prefill):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(tmp_path, DEVICE, prefill)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path, DEVICE, prefill):
    path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
    ps = prompts(3, seed=41, lo=2, hi=30)
    # A 32-token budget chunks the longer prompts, so later chunks attend to cached K/V.
    llm = LLM(path, device=DEVICE, dtype="float32", use_triton=True, enforce_eager=True,
              max_model_len=128, block_size=4, max_num_batched_tokens=32, prefill_attention=prefill)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(path, ps, 5)


@pytest.mark.parametrize("arch,fused", [
    ("llama_gqa_untied", True),  # untied LM head
    ("qwen2_bias", True),  # qkv bias before the rotary in the fused norm + qkv + rope launch, tied LM head
    ("qwen3_qknorm", True),  # q/k norms between the fused qkv launch and rope_store
])
def test_fused_small_batch_decode(tmp_path, monkeypatch, arch, fused):
    calls, rope_calls = [], []
    gemv, gemv_rope_store = llama_module.gemv_kernels.gemv, llama_module.gemv_kernels.gemv_rope_store

    def counting_gemv(*args, **kwargs):
        calls.append(args[1].shape)
        return gemv(*args, **kwargs)

    def counting_gemv_rope_store(*args, **kwargs):
        rope_calls.append(args[1].shape)
        return gemv_rope_store(*args, **kwargs)

    monkeypatch.setattr(llama_module.gemv_kernels, "gemv", counting_gemv)
    monkeypatch.setattr(llama_module.gemv_kernels, "gemv_rope_store", counting_gemv_rope_store)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir(arch, str(tmp_path), seed=5)
        ps = prompts(4, seed=43, lo=2, hi=20)
        llm = LLM(path, device=DEVICE, dtype="float32", use_triton=True, enforce_eager=True,
                  max_model_len=128, block_size=4, fused_decode=fused)
        outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        assert [o.token_ids for o in outs] == hf_greedy(path, ps, 5)
    finally:
        torch.set_num_threads(threads)
    # Four launches a layer per decode forward (qkv, o_proj, gate_up, down); none when off. The
    # qkv launch rotates and stores k, v itself (gemv_rope_store) but for Qwen3's q/k norms.
    layers = llm.engine.config.hf_config.num_hidden_layers
    if not fused:
        assert not calls and not rope_calls
        return
    gemvs_per_layer = 4 if arch == "qwen3_qknorm" else 3
    forwards = len(calls) // (gemvs_per_layer * layers)
    assert forwards > 0 and len(calls) == gemvs_per_layer * layers * forwards
    assert len(rope_calls) == (0 if arch == "qwen3_qknorm" else layers * forwards)


def test_split_decode_attention(tmp_path):
    """max_model_len 512 with 128-token partitions: decode attention runs 4 splits merged inside
    its launch (kernels/paged_attention.py), most of them empty at these short contexts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama_gqa_untied", str(tmp_path), seed=7)
        ps = prompts(2, seed=45, lo=2, hi=20)
        llm = LLM(path, device=DEVICE, dtype="float32", use_triton=True, enforce_eager=True,
                  max_model_len=512, block_size=4)
        outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert llm.engine.runner.attn_layers[0].decode_splits(len(ps)) == 4
        assert [o.token_ids for o in outs] == hf_greedy(path, ps, 4)
    finally:
        torch.set_num_threads(threads)


def test_fused_decode_logprobs_match_unfused(tmp_path):
    """Closer than greedy tokens: the fused path's logprobs equal the unfused Triton path's up to
    fp32 reduction order (a wrong residual or norm would move them far more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("qwen2_bias", str(tmp_path), seed=6)
        ps = prompts(3, seed=44, lo=2, hi=20)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
        runs = []
        for fused in (True, False):
            llm = LLM(path, device=DEVICE, dtype="float32", use_triton=True, enforce_eager=True,
                      max_model_len=128, block_size=4, fused_decode=fused)
            runs.append(llm.generate(ps, params))
    finally:
        torch.set_num_threads(threads)
    fused_outs, plain_outs = runs
    assert [o.token_ids for o in plain_outs] == hf_greedy(path, ps, 4)
    for a, b in zip(fused_outs, plain_outs):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5)
