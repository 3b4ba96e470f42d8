"""The verify forward as decode pseudo-rows with the decode path's Triton kernels (fused
small-batch matmuls with rope + K/V store, paged decode attention), interpreted on the CPU: the
prefill verify path's logits (Triton varlen prefill attention) in a ragged batch across block
boundaries, also through decode graph buckets whose padding rows store nothing
(tests/kernels/graph_replay.py replays each bucket eagerly from the staging buffer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "spec_decode"))
from tiny_models import make_model_dir  # noqa: E402
from verify_batch import verify_chunks, verify_runner  # noqa: E402

from graph_replay import eager_decode_graphs  # noqa: E402
from support import count_fused_rows  # noqa: E402


@pytest.mark.parametrize("graphed", [False, True])
def test_pseudo_rows_with_triton_kernels_give_the_prefill_verify_logits(tmp_path, monkeypatch, graphed):
    fused_rows = count_fused_rows(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
        _, runner = verify_runner(path, use_triton=True, enforce_eager=True, num_decode_steps=1)
        if graphed:
            runner.graphs = eager_decode_graphs(runner, 16)
        chunks = verify_chunks()
        with torch.inference_mode():
            prefill = runner.verify_paths.prefill_all_logits(chunks).clone()
            fused_rows.clear()
            pseudo = runner.verify_paths.all_logits(chunks).clone()
    finally:
        torch.set_num_threads(threads)
    assert prefill.abs().max() > 0.1
    torch.testing.assert_close(pseudo, prefill, rtol=1e-4, atol=1e-4)
    # Every layer's qkv launch took all the rows at once: 10, or the bucket of 16 with 6 padding rows.
    layers = runner.model.config.num_hidden_layers
    assert fused_rows == [16 if graphed else 10] * layers
