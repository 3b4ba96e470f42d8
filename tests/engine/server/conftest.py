"""Fixtures of the server tests: tiny models with real tokenizers, and a running server."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import ServerThread  # noqa: E402

TEMPLATE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level tokenizer (BOS/EOS set), no chat template."""
    from support import save_tiny_artifact

    return str(save_tiny_artifact(tmp_path_factory.mktemp("server_tiny") / "model"))


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, smollm2_artifact) -> str:
    """A tiny random Llama over SmolLM2's real tokenizer and chat template (vocab 49152)."""
    import torch
    from transformers import AutoModelForCausalLM

    from support import tiny_llama_config

    path = tmp_path_factory.mktemp("server_chat") / "model"
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=49152, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in TEMPLATE_FILES:
        if (smollm2_artifact / name).exists():
            shutil.copy(smollm2_artifact / name, path / name)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with ServerThread(tiny_artifact) as s:
        yield s


@pytest.fixture(scope="module")
def chat_server(chat_model):
    with ServerThread(chat_model) as s:
        yield s
