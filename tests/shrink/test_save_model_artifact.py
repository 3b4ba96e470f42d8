"""save_model_artifact with a save dtype: the distill stage saved a tied embedding twice (as
lm_head.weight too) and recorded float32 in config.json although the tensors were bf16, so the
demo's distilled student came out larger than the teacher it was cut from."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from shrink.modeling import save_model_artifact


def test_bf16_save_of_a_tied_fp32_model_writes_each_weight_once(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    save_model_artifact(tmp_path / "a", model, None, stage="distill", dtype="bf16")
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16).float())
