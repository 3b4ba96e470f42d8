"""The prefill graphs' host side (engine/cuda_graphs.py) checked on the CPU, with Triton
interpreted: each captured graph is replaced by an eager forward over the same staged inputs, so
the bucket padding (tokens that store nothing, sequences with no query tokens), the slots, block
tables and last-token rows must give the eager prefill's logits and tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import make_model_dir, prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.cuda_graphs import PrefillGraphs  # noqa: E402
from graph_replay import EagerReplay  # noqa: E402
from engine.scheduler import ScheduledBatch  # noqa: E402
from engine.sequence import Sequence  # noqa: E402


def test_prefill_graph_staging_gives_the_eager_logits(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
        llm = LLM(path, device="cpu", dtype="float32", use_triton=True, enforce_eager=True, max_model_len=64,
                  block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
        runner, bm = llm.engine.runner, llm.engine.block_manager
        graphs = PrefillGraphs(runner.model, runner.device, 4, 16, max_tokens=32, max_seqs=16)
        for key in [(t, s) for t in graphs.token_buckets for s in graphs.seq_buckets]:
            graphs.graphs[key] = EagerReplay(graphs, key)
        seen = []
        inner = runner.sampler.sample_step

        def recording(seqs, logits, rows=None):
            seen.append((logits.clone(), list(rows)))
            return inner(seqs, logits, rows)

        runner.sampler.sample_step = recording
        a, b = (Sequence(p, SamplingParams(temperature=0.0)) for p in prompts(2, seed=9, lo=13, hi=14)[:1]
                + prompts(1, seed=10, lo=6, hi=7))
        for s in (a, b):
            bm.allocate(s)
        # A first chunk of a and the whole of b (14 tokens in a bucket of 16, 2 sequences in one of
        # 16), then the rest of a, which attends to its cached K/V.
        for batch in (ScheduledBatch([a, b], True, [8, b.num_tokens]), ScheduledBatch([a], True, [a.num_tokens - 8])):
            results = []
            for prefill_graphs in (None, graphs):
                runner.prefill_graphs = prefill_graphs
                results.append(runner.run(batch))
            (eager_logits, eager_rows), (graph_logits, graph_rows) = seen[-2:]
            assert results[0].tokens == results[1].tokens and any(results[0].tokens)
            for i in range(len(batch.seqs)):
                assert (eager_rows[i] < 0) == (graph_rows[i] < 0)
                if eager_rows[i] >= 0:
                    torch.testing.assert_close(graph_logits[graph_rows[i]], eager_logits[eager_rows[i]])
            a.num_computed_tokens += batch.num_scheduled[0]
    finally:
        torch.set_num_threads(threads)
