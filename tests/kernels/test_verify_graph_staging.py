"""The verify graphs' host side (PrefillGraphs with all_rows, engine/cuda_graphs.py: the verify of a
batch too large for decode pseudo-rows) on the CPU with
Triton interpreted: each graph is replaced by an eager forward over its staged inputs, so the
padding, slots, tables and the every-row logits must give the eager verify forward's logits, and a
speculative engine running through them the plain greedy output."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import make_model_dir, prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.context import reset_context, set_context  # noqa: E402
from engine.cuda_graphs import PrefillGraphs  # noqa: E402
from graph_replay import EagerReplay  # noqa: E402
from support import widen_m1_gemv_programs  # noqa: E402


def _eager_graphs(runner) -> PrefillGraphs:
    graphs = PrefillGraphs(runner.model, runner.device, runner.block_size, 16, max_tokens=32, max_seqs=16,
                           all_rows=True)
    for key in [(t, s) for t in graphs.token_buckets for s in graphs.seq_buckets]:
        graphs.graphs[key] = EagerReplay(graphs, key)
    return graphs


def test_verify_graph_logits_equal_the_eager_verify_and_the_engine_output_is_unchanged(tmp_path, monkeypatch):
    # The last sequence's M == 1 decode steps (plain run) and drafts: GEMVs of one column a program,
    # which the interpreter runs one at a time; 16 columns a program, the same kernels and sums
    # (support.widen_m1_gemv_programs; one column a program stays the kernel tests').
    widen_m1_gemv_programs(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
        kw = dict(device="cpu", dtype="float32", use_triton=True, enforce_eager=True, max_model_len=64, block_size=4,
                  num_kv_blocks=64, enable_prefix_caching=False, num_decode_steps=1)
        ps = prompts(3, seed=11, lo=5, hi=12)
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 6, 11)]
        base = [o.token_ids for o in LLM(path, **kw).generate([{"prompt_token_ids": p} for p in ps], params)]
        # The target drafts for itself: every draft token is accepted, through graphs and caches alike.
        llm = LLM(path, **kw, speculative_config={"model": path, "num_speculative_tokens": 3})
        runner = llm.engine.runner
        graphs = _eager_graphs(runner)
        # Direct: three chunks of 4, 2 and 3 tokens after 8, 5 and 0 cached positions.
        chunks = [([5, 6, 7, 8], 8, [0, 1, 2]), ([9, 10], 5, [3, 4]), ([11, 12, 13], 0, [5])]
        runner.verify_paths.prefill_all_logits([([1] * 8, 0, [0, 1, 2]), ([2] * 5, 0, [3, 4])])  # their context
        eager = runner.verify_paths.prefill_all_logits(chunks).clone()
        runner.verify_paths.verify_graphs = graphs
        torch.testing.assert_close(runner.verify_paths.prefill_all_logits(chunks), eager)
        # Verify batches this small run as decode pseudo-rows; none here, so that they take the graphs.
        runner.verify_paths.max_pseudo_rows = 0
        replays = []
        run = graphs.run
        graphs.run = lambda chunks, device_ids=None, hidden=False: (replays.append(device_ids is not None)
                                                                      or run(chunks, device_ids, hidden))
        out = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], params)]
        assert out == base
        assert replays and all(replays)  # the draft's tokens reached the graphs on the device
        assert llm.engine.num_spec_steps > 0 and llm.engine.spec_metrics.acceptance_rate == 1.0
    finally:
        torch.set_num_threads(threads)
