"""Engine constants reach the model once, at construction; the environment is read once, in
EngineConfig."""

from __future__ import annotations

from engine import LLM
from engine.config import EngineConfig
from engine.layers.attention import Attention
from engine.layers.rmsnorm import RMSNorm


def test_engine_constants_reach_every_layer_at_construction(model_dir):
    llm = LLM(model_dir("llama_gqa_untied"), device="cpu", max_model_len=96, block_size=8, use_triton=True,
              fused_decode=False, pdl=False)
    model = llm.engine.runner.model
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert attn and all(a.use_triton and not a.pdl and a.block_size == 8 and a.max_model_len == 96 for a in attn)
    assert norms and all(n.use_triton for n in norms)
    assert all(layer.mlp.use_triton for layer in model.model.layers)
    assert not model.model.fused_decode and not model.model.pdl


def test_shrink_pdl_is_read_once_by_the_config(model_dir, monkeypatch):
    path = model_dir("llama_gqa_untied")
    assert EngineConfig(model=path).pdl
    monkeypatch.setenv("SHRINK_PDL", "0")
    assert not EngineConfig(model=path).pdl
    assert not EngineConfig(model=path).model_options().pdl
