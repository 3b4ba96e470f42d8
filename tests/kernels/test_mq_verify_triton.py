"""The verify forward with multi-query decode attention through the engine's Triton kernels,
interpreted on the CPU: the prefill verify path's logits (varlen prefill attention), eagerly and
through the multi-query graph sets' host side (each graph an eager replay of its bucket:
tests/kernels/graph_replay.py), in a ragged batch (varlen layout) and in whole sequences of k + 1
(the pseudo-row layout, padded to a decode bucket)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "spec_decode"))
from test_mq_verify import uniform_chunks  # noqa: E402
from tiny_models import make_model_dir  # noqa: E402
from verify_batch import verify_chunks, verify_runner  # noqa: E402

from engine.cuda_graphs import PrefillGraphs  # noqa: E402
from kernels import verify_attention  # noqa: E402
from graph_replay import EagerReplay, eager_decode_graphs  # noqa: E402


@pytest.mark.parametrize("graphed", [False, True])
def test_multi_query_verify_with_triton_kernels_gives_the_prefill_verify_logits(tmp_path, monkeypatch, graphed):
    launches = []  # (rows of q, sequences, varlen) of each multi-query attention launch
    kernel = verify_attention.paged_verify_attention

    def counting(q, k_cache, v_cache, tables, lens, scale, q_len, cu=None, **kw):
        launches.append((q.shape[0], lens.shape[0], cu is not None))
        return kernel(q, k_cache, v_cache, tables, lens, scale, q_len, cu, **kw)

    monkeypatch.setattr(verify_attention, "paged_verify_attention", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
        _, runner = verify_runner(path, use_triton=True, enforce_eager=True, num_decode_steps=1)
        q = runner.verify_query_len
        if graphed:
            runner.verify_paths.mq_graphs = eager_decode_graphs(runner, 16, q)
            assert runner.verify_paths.mq_graphs.buckets == [8, 16]
            graphs = PrefillGraphs(runner.model, runner.device, runner.block_size, 16, max_tokens=32, max_seqs=16,
                                   all_rows=True, verify_query_len=q)
            for key in [(t, s) for t in graphs.token_buckets for s in graphs.seq_buckets]:
                graphs.graphs[key] = EagerReplay(graphs, key)
            runner.verify_paths.mq_verify_graphs = graphs
        with torch.inference_mode():
            for chunks in (verify_chunks(), uniform_chunks()):
                ref = runner.verify_paths.prefill_all_logits(chunks).clone()
                assert ref.abs().max() > 0.1
                mq = runner.verify_paths.prefill_all_logits(chunks, multi_query=True).clone()
                torch.testing.assert_close(mq, ref, rtol=1e-4, atol=1e-4)
            rows = runner.verify_paths.pseudo_row_logits(chunks, multi_query=True).clone()  # 15 rows: the bucket of 16
            torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-4)
            one = runner.verify_paths.pseudo_row_logits(chunks[:1], multi_query=True).clone()  # 5 rows: the bucket of 8
            torch.testing.assert_close(one, ref[:5], rtol=1e-4, atol=1e-4)
        # Every layer of every multi-query forward attended through the kernel, in its layout:
        # varlen over the graph's 16 sequence slots or the chunks; pseudo-rows over whole sequences.
        layers = runner.model.config.num_hidden_layers
        seqs = 16 if graphed else 3
        rows = [16, 16] if graphed else [10, 15]
        assert launches == ([(rows[0], seqs, True)] * layers + [(rows[1], seqs, True)] * layers
                            + [(16 if graphed else 15, 3, False)] * layers + [(8 if graphed else 5, 1, False)] * layers)
    finally:
        torch.set_num_threads(threads)
