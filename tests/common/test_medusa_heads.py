"""common/medusa.py: the Medusa heads' artifact round-trips exactly and every defect of one is named."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.medusa import MedusaError, MedusaHeads, is_medusa_dir, load_heads, save_heads


def _random_heads(num_heads=3, num_layers=2, hidden=8, vocab=32):
    heads = MedusaHeads(hidden, vocab, num_heads, num_layers)
    torch.manual_seed(0)
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    return heads


def test_untrained_heads_are_the_identity():
    """Medusa's initialisation: every head's LM-head input is the target's hidden state."""
    heads = MedusaHeads(8, 32, 4)
    x = torch.randn(5, 8)
    out = heads(x)
    assert out.shape == (4, 5, 8)
    assert torch.equal(out, x.expand(4, 5, 8))


def test_forward_is_the_residual_silu_blocks():
    heads = _random_heads()
    x = torch.randn(5, 8)
    for i, blocks in enumerate(heads.heads):
        g = x
        for b in blocks:
            g = g + torch.nn.functional.silu(b(g))
        torch.testing.assert_close(heads(x)[i], g, rtol=0, atol=0)
    assert heads(x, num_heads=2).shape == (2, 5, 8)


def test_round_trip(tmp_path):
    heads = _random_heads()
    save_heads(heads, tmp_path)
    assert is_medusa_dir(tmp_path)
    loaded = load_heads(tmp_path, hidden_size=8, vocab_size=32)
    x = torch.randn(3, 8)
    assert torch.equal(heads(x), loaded(x))


@pytest.mark.parametrize("defect, message", [
    ("hidden", "hidden_size 8 does not match the target's 16"),
    ("vocab", "vocab_size 32 does not match the target's 64"),
    ("missing_tensor", "tensors missing ['heads.2.1.weight']"),
    ("extra_tensor", "unexpected ['stray']"),
    ("shape", "heads.0.0.bias has shape (7,), expected (8,)"),
    ("config_key", "missing num_layers"),
    ("architecture", "architectures must name 'MedusaHeads'"),
    ("no_weights", "no model.safetensors"),
])
def test_defects_are_named(tmp_path, defect, message):
    save_heads(_random_heads(), tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    state, cfg = load_file(str(weights)), json.loads(config.read_text())
    kwargs = {}
    if defect == "hidden":
        kwargs["hidden_size"] = 16
    elif defect == "vocab":
        kwargs["vocab_size"] = 64
    elif defect == "missing_tensor":
        del state["heads.2.1.weight"]
    elif defect == "extra_tensor":
        state["stray"] = torch.zeros(1)
    elif defect == "shape":
        state["heads.0.0.bias"] = torch.zeros(7)
    elif defect == "config_key":
        del cfg["num_layers"]
    elif defect == "architecture":
        cfg["architectures"] = ["LlamaForCausalLM"]
    elif defect == "no_weights":
        weights.unlink()
    if weights.exists():
        save_file(state, str(weights))
    config.write_text(json.dumps(cfg))
    with pytest.raises(MedusaError, match=re.escape(message)):
        load_heads(tmp_path, **kwargs)
    assert not is_medusa_dir(tmp_path) or defect != "architecture"
