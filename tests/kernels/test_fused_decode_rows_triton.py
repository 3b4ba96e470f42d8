"""EngineConfig.fused_decode_rows pinned, with the Triton kernels on (interpreted on the CPU): decode
forwards of at most that many rows take the fused path (one gemv_rope_store launch per layer),
larger ones the unfused Triton path, and the greedy tokens are transformers' either way."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import hf_greedy, make_model_dir, prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from support import count_fused_rows  # noqa: E402


def test_pinned_fused_rows_split_decode_between_the_paths(tmp_path, monkeypatch):
    fused_rows = count_fused_rows(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = make_model_dir("llama3_rope_mqa", str(tmp_path), seed=3)
        llm = LLM(path, device="cpu", dtype="float32", use_triton=True, enforce_eager=True, max_model_len=128,
                  block_size=4, fused_decode_rows=2)
        assert llm.engine.runner.model.model.fused_rows == 2
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for n, seed in ((4, 47), (2, 48)):  # decode at 4 rows (unfused), then at 2 (fused)
            ps = prompts(n, seed=seed, lo=2, hi=20)
            fused_rows.clear()
            assert [o.token_ids for o in llm.generate(ps, params)] == hf_greedy(path, ps, 4)
            layers = llm.engine.config.hf_config.num_hidden_layers
            if n > 2:
                assert not fused_rows
            else:
                assert fused_rows and len(fused_rows) % layers == 0 and set(fused_rows) == {2}
    finally:
        torch.set_num_threads(threads)
