"""engine/gguf.py's conversion cache, from a cold cache: the first call converts and renames the
directory into place (with the marker that lets common/dirs.py replace it later), the second
reuses it. A cold cache once failed on the GPU host (replace_dir_atomically lost its marker
argument) while every warm-cache test passed."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import gguf
from tests.engine.tiny_models import byte_tokenizer


def test_a_cold_cache_converts_once_then_reuses(tmp_path, monkeypatch):
    calls = []

    def fake_load(path, dtype=torch.float32):
        calls.append(path)
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        return LlamaForCausalLM(cfg).to(dtype), byte_tokenizer()

    monkeypatch.setattr(gguf, "load_gguf", fake_load)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF not really, but hashed")
    cache = tmp_path / "cache"
    first = gguf.gguf_model_dir(source, cache)
    assert (first / "model.safetensors").is_file() and (first / "config.json").is_file()
    assert (first / gguf.CONVERTED_MARKER).is_file()
    assert gguf.gguf_model_dir(source, cache) == first
    assert len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
