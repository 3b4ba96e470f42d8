"""The GPU path (Triton kernels, CUDA graphs) against transformers and against itself."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NEW_TOKENS

from engine import LLM, SamplingParams
from kernels.gemv import SMALL_M

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama_gqa_untied", "qwen3_qknorm", "qwen2_bias"])
def test_cuda_graphs_fp32_greedy_matches_transformers(arch, model_dir, mixed_prompts, hf_reference):
    # fp32 on the GPU (IEEE dots in the Triton kernels), tiny pool: preemption, chunking, graphs.
    llm = LLM(model_dir(arch), device="cuda", dtype="float32", max_model_len=256, block_size=4,
              num_kv_blocks=96, max_num_batched_tokens=128, cuda_graph_max_bs=32)
    assert llm.engine.runner.graphs  # decode really runs through CUDA graphs
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference(arch, mixed_prompts)
    assert llm.engine.scheduler.num_preemptions > 0


def test_triton_prefill_fp32_greedy_matches_transformers(model_dir, mixed_prompts, hf_reference):
    llm = LLM(model_dir("mistral"), device="cuda", dtype="float32", max_model_len=256, block_size=4,
              max_num_batched_tokens=64, cuda_graph_max_bs=32, prefill_attention="triton")
    outs = llm.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference("mistral", mixed_prompts)


def test_cuda_graphs_equal_eager_in_bf16(model_dir):
    # 16 prompts of one length decode in lockstep at batch 16, a captured bucket: the graph replays
    # the same kernels on the same shapes as eager mode, so the tokens must be identical.
    path = model_dir("llama3_rope_mqa")
    g = torch.Generator().manual_seed(5)
    ps = torch.randint(3, 256, (16, 20), generator=g).tolist()
    # A fixed pool: two engines live at once here, and a pool sized from free memory takes 90% of it.
    # fused_decode_rows pinned: each engine would time it apart (graphed and eager differently), and
    # the same kernels need the same path at batch 16.
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256, block_size=16, enable_prefix_caching=False,
              kv_cache_tokens=16384, fused_decode_rows=SMALL_M)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    graphs = LLM(path, **kw).generate(ps, params)
    eager = LLM(path, enforce_eager=True, **kw).generate(ps, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_prefill_graphs_fp32_greedy_matches_transformers(model_dir, hf_reference):
    # First one request at a time (every prefill one sequence's): short prompts padded up to a
    # bucket, prompts sharing a 40-token prefix (prefix-cache hits: the graph starts mid-sequence)
    # and a 150-token prompt chunked into 64-token steps; then all of them at once, so that steps
    # prefill several sequences (padding sequences in the 16-sequence bucket) next to chunks.
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 256, (40,), generator=g).tolist()
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 5, 17, 33)]
    ps += [prefix + torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 20)]
    ps.append(torch.randint(3, 256, (150,), generator=g).tolist())
    llm = LLM(model_dir("llama_gqa_untied"), device="cuda", dtype="float32", max_model_len=256, block_size=4,
              max_num_batched_tokens=64, kv_cache_tokens=4096, cuda_graph_max_bs=8)
    graphs = llm.engine.runner.prefill_graphs
    assert graphs is not None and sorted(graphs.graphs) == [(t, s) for t in (16, 32, 64) for s in (1, 16)]
    replays = []
    run = graphs.run
    graphs.run = lambda chunks: replays.append([(len(ids), start) for ids, start, _ in chunks]) or run(chunks)
    want = hf_reference("llama_gqa_untied", ps)
    assert [llm.generate([p], GREEDY)[0].token_ids for p in ps] == want
    assert len(replays) >= len(ps) + 2  # every prefill, the long prompt's chunks included
    assert any(start > 0 for step in replays for _, start in step)  # continued chunks and prefix hits
    replays.clear()
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == want
    assert any(len(step) > 1 for step in replays)


def test_graphs_capture_when_the_step_kernel_was_never_launched_in_the_process(model_dir):
    """The two-H200 run of 2026-11-29: an int8 artifact's engine failed to capture its multi-step
    decode graph ("operation not permitted when stream is capturing") at the greedy advance's launch,
    its first in the process for that specialization. Capture now warms it first; with its
    compiled-kernel cache emptied, an engine still captures and decodes as eagerly."""
    from kernels.greedy_advance import _greedy_advance_kernel

    path = model_dir("llama_gqa_untied")
    kw = dict(device="cuda", dtype="float32", max_model_len=128, kv_cache_tokens=4096, num_decode_steps=4)
    ps = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    _greedy_advance_kernel.device_caches.clear()
    llm = LLM(path, **kw)
    assert llm.engine.runner.graphs is not None
    graphed = llm.generate(ps, params)
    assert llm.engine.num_multi_steps > 0
    del llm
    eager = LLM(path, enforce_eager=True, **kw).generate(ps, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
