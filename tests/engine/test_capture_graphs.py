"""cuda_graphs.capture_graphs' choice of graph sets and their sizes, on the CPU: the real DecodeGraphs
and PrefillGraphs are built (their buckets), only their capture is recorded instead of run. Every
set is captured into the pool of the first, in the order decode, multi-query decode, prefill,
verify, multi-query verify."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.cuda_graphs import DecodeGraphs, EngineGraphs, PrefillGraphs, capture_graphs


@pytest.fixture
def capture(monkeypatch):
    """capture_graphs(**config overrides, verify_max_tokens, verify_query_len) -> (graphs, [(set, pool)])."""
    order: list[tuple[object, object]] = []
    monkeypatch.setattr(DecodeGraphs, "capture", lambda self, pool=None: order.append((self, pool)) or pool or "pool")
    monkeypatch.setattr(PrefillGraphs, "capture", lambda self, pool: order.append((self, pool)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def run(verify_max_tokens: int = 0, verify_query_len: int = 0, **overrides) -> tuple[EngineGraphs, list]:
        config = SimpleNamespace(**{
            "cuda_graph_max_bs": 8, "max_num_seqs": 4, "num_decode_steps": 1, "prefill_graph_max_tokens": 512,
            "max_num_batched_tokens": 256, "max_model_len": 300, "triton_enabled": True,
            "prefill_attention": "triton", "torch_device": torch.device("cpu"), "block_size": 16, **overrides})
        graphs = capture_graphs(None, None, config, 19, verify_max_tokens, min(verify_max_tokens, 16),
                                verify_query_len)
        return graphs, list(order)

    return run


def test_sdpa_prefill_captures_only_the_decode_graphs(capture):
    graphs, order = capture(prefill_attention="sdpa", num_decode_steps=4)
    assert graphs.decode.buckets == [1, 2, 4] and graphs.decode.num_steps == 4  # max_num_seqs below cuda_graph_max_bs
    assert graphs.mq is graphs.prefill is graphs.verify is graphs.mq_verify is None
    assert order == [(graphs.decode, None)]


def test_a_speculative_engine_captures_every_set_in_one_pool(capture):
    graphs, order = capture(verify_max_tokens=80, verify_query_len=5)
    assert graphs.decode.buckets == [1, 2, 4, 8, 16]  # room for 16 verify pseudo-rows
    assert graphs.mq.buckets == [8, 16] and graphs.mq.verify_query_len == 5 and graphs.mq.num_steps == 1
    assert graphs.prefill.token_buckets == [16, 32, 64, 128, 256] and not graphs.prefill.all_rows
    assert graphs.verify.token_buckets == [16, 32, 64, 128]  # the bucket that holds 80 tokens
    assert graphs.verify.all_rows and graphs.verify.verify_query_len == 0
    assert graphs.mq_verify.token_buckets == [16, 32, 64, 128]
    assert graphs.mq_verify.all_rows and graphs.mq_verify.verify_query_len == 5
    assert order == [(graphs.decode, None), (graphs.mq, "pool"), (graphs.prefill, "pool"), (graphs.verify, "pool"),
                     (graphs.mq_verify, "pool")]


def test_sets_that_cannot_hold_their_tokens_are_left_out(capture):
    # k + 1 = 17 verify rows: more than any decode bucket; a verify of 1000 tokens: the largest prefill bucket
    graphs, _ = capture(verify_max_tokens=1000, verify_query_len=17)
    assert graphs.decode.max_bs == 16 and graphs.mq is None
    assert graphs.verify.token_buckets[-1] == graphs.prefill.token_buckets[-1] == 256
    graphs, order = capture(verify_max_tokens=80, verify_query_len=5, prefill_graph_max_tokens=8)
    assert graphs.prefill is graphs.verify is graphs.mq_verify is None  # below the smallest token bucket
    assert [s for s, _ in order[-2:]] == [graphs.decode, graphs.mq]
