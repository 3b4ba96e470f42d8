"""The model directory's tokenizer, if it has one (the engine and the draft-model check both read it)."""

from __future__ import annotations

import os
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str) -> Any | None:
    if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
