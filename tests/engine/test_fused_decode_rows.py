"""EngineConfig.fused_decode_rows (issue 13): the most decode rows that take the fused small-batch
path, pinned or timed at startup on a GPU (engine/fused_rows.py). The choice from made-up timings,
the config's validation, a pinned limit within what the weights allow, and greedy output equal to
transformers' with it pinned (CPU) or timed (GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import NEW_TOKENS

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.fused_rows import choose_fused_rows, set_fused_rows
from kernels.gemv import SMALL_M

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _timings(fused_wins: dict[int, bool]) -> dict[int, dict[str, float]]:
    return {b: {"fused": 10.0 if win else 30.0, "unfused": 20.0} for b, win in fused_wins.items()}


@pytest.mark.parametrize("wins,rows", [
    ({1: True, 2: True, 4: True, 8: False, 16: False}, 4),
    ({1: False, 2: True, 4: True}, 0),  # loses at batch 1: never fused
    ({1: True, 2: False, 4: True, 8: True}, 1),  # a win past a loss does not count
    ({1: True, 2: True, 4: True, 8: True, 16: True}, 16),
    ({1: True, 2: True, 4: True, 8: True, 10: True}, 10),  # the largest graph bucket is 10
])
def test_choice_is_the_largest_bucket_won_at_every_bucket_up_to_it(wins, rows):
    assert choose_fused_rows(_timings(wins)) == rows
    assert choose_fused_rows(dict(reversed(_timings(wins).items()))) == rows  # in bucket order, not dict order


def test_a_tie_goes_to_the_unfused_path():
    assert choose_fused_rows({1: {"fused": 5.0, "unfused": 5.0}}) == 0
    assert choose_fused_rows({}) == 0


@pytest.mark.parametrize("bad", [-1, SMALL_M + 1, 2.0, "4", True])
def test_config_refuses_a_bad_fused_decode_rows(model_dir, bad):
    with pytest.raises(ValueError, match=f"fused_decode_rows: must be None .* or an integer in 0..{SMALL_M}"):
        EngineConfig(model=model_dir("llama_gqa_untied"), fused_decode_rows=bad)


@pytest.mark.parametrize("rows", [None, 0, 3, SMALL_M])
def test_config_takes_none_or_a_row_count(model_dir, rows):
    assert EngineConfig(model=model_dir("llama_gqa_untied"), fused_decode_rows=rows).fused_decode_rows == rows


def test_batch_invariant_refuses_a_pinned_limit_below_every_row(model_dir):
    path = model_dir("llama_gqa_untied")
    words = "batch_invariant: needs the fused decode at every row count, not fused_decode_rows=4"
    with pytest.raises(ValueError, match=words):
        EngineConfig(model=path, device="cpu", use_triton=True, batch_invariant=True, fused_decode_rows=4)
    assert EngineConfig(model=path, device="cpu", use_triton=True, batch_invariant=True, fused_decode_rows=SMALL_M)


def _runner(cap: int, **config) -> SimpleNamespace:
    """What set_fused_rows reads of a model runner: its config, device and model."""
    cfg = SimpleNamespace(**{"fused_decode_rows": None, "batch_invariant": False, "tensor_parallel_size": 1,
                             "hf_config": SimpleNamespace(hidden_size=64), **config})
    model = SimpleNamespace(fused_rows=cap, fused_decode=True, fusable=cap > 0)
    return SimpleNamespace(config=cfg, device=torch.device("cpu"), model=SimpleNamespace(model=model))


@pytest.mark.parametrize("cap,pinned,rows", [(SMALL_M, 2, 2), (SMALL_M, 0, 0), (1, 4, 1), (0, 4, 0)])
def test_a_pinned_limit_stays_within_what_the_weights_allow(cap, pinned, rows):
    """1 with 2:4 + int4 weights, 0 where the fused kernels cannot read a linear (update_fusable)."""
    runner = _runner(cap, fused_decode_rows=pinned)
    assert set_fused_rows(runner, 256, graphed=True) == {}
    assert runner.model.model.fused_rows == rows


def test_nothing_is_timed_on_the_cpu():
    runner = _runner(SMALL_M)
    assert set_fused_rows(runner, 256, graphed=False) == {}
    assert runner.model.model.fused_rows == SMALL_M


@pytest.mark.parametrize("rows", [None, 2, 0])
def test_greedy_with_the_limit_pinned_matches_transformers_on_the_cpu(rows, model_dir, mixed_prompts, hf_reference):
    """The CPU's torch path ignores the limit (no Triton: no fused kernels; the Triton path with
    a pinned limit: tests/kernels/test_fused_decode_rows_triton.py); the engine still runs it."""
    arch = "llama_gqa_untied"
    llm = LLM(model_dir(arch), device="cpu", max_model_len=256, block_size=4, max_num_batched_tokens=96,
              max_num_seqs=32, fused_decode_rows=rows)
    runner = llm.engine.runner
    assert runner.model.model.fused_rows == (SMALL_M if rows is None else rows) and runner.fused_rows_us == {}
    assert [o.token_ids for o in llm.generate(mixed_prompts, GREEDY)] == hf_reference(arch, mixed_prompts)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_timed_limit_is_a_bucket_and_greedy_matches_transformers_on_the_gpu(enforce_eager, model_dir, mixed_prompts,
                                                                            hf_reference):
    """fp32 on the GPU (IEEE dots in the Triton kernels, as test_engine_gpu.py): whatever the
    timing chose, the tokens are transformers'. The timings cover every graph bucket up to
    SMALL_M (graphed) or every power of two up to it (eager), and the limit is their choice."""
    arch = "llama_gqa_untied"
    llm = LLM(model_dir(arch), device="cuda", dtype="float32", max_model_len=256, block_size=4,
              max_num_batched_tokens=128, cuda_graph_max_bs=32, enforce_eager=enforce_eager)
    runner = llm.engine.runner
    us = runner.fused_rows_us
    assert sorted(us) == [1, 2, 4, 8, 16]
    assert all(t["fused"] > 0 and t["unfused"] > 0 for t in us.values())
    rows = runner.model.model.fused_rows
    assert rows == choose_fused_rows(us) and rows in (0, *us)
    if not enforce_eager:
        assert all(b in runner.graphs.buckets for b in us)
    assert [o.token_ids for o in llm.generate(mixed_prompts, GREEDY)] == hf_reference(arch, mixed_prompts)
