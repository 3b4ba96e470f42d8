"""Fixtures for the engine tests: tiny random models of every architecture and HF references."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHS, NEW_TOKENS, hf_greedy, make_model_dir, prompts  # noqa: E402

NUM_PROMPTS = 32


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine_models")


@pytest.fixture(scope="session")
def model_dir(model_root):
    """model_dir(name) -> path of a saved tiny model (made once per session)."""

    def get(name: str, with_tokenizer: bool = False) -> str:
        seed = sorted(ARCHS).index(name)
        sub = model_root / ("tok" if with_tokenizer else "plain")
        return make_model_dir(name, str(sub), seed=seed, with_tokenizer=with_tokenizer)

    return get


@pytest.fixture(scope="session")
def mixed_prompts() -> list[list[int]]:
    return prompts(NUM_PROMPTS, seed=1, lo=1, hi=70)


_REFS: dict = {}


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """hf_reference(name, prompts) -> greedy continuations by transformers (cached)."""

    def get(name: str, token_prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
        key = (name, tuple(map(tuple, token_prompts)), new_tokens)
        if key not in _REFS:
            _REFS[key] = hf_greedy(model_dir(name), token_prompts, new_tokens)
        return _REFS[key]

    return get


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and stay fast when the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
