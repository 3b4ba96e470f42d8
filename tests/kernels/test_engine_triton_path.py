"""The engine with its Triton kernels switched on (interpreted on CPU) gives transformers' tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import hf_greedy, make_model_dir, prompts  # noqa: E402

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
