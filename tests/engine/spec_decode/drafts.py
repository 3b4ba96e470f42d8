"""Draft models for the speculative decoding tests: the target plus noise, so that a draft agrees
with the target part of the time."""

from __future__ import annotations

import os
import shutil

import torch
from transformers import AutoModelForCausalLM


def perturbed_copy(src: str, dst: str, sigma: float, seed: int = 1) -> str:
    """The target's weights plus N(0, sigma) noise (with its tokenizer): a drafter that agrees with
    the target part of the time (sigma 0.008: about 40% of the draft tokens are accepted)."""
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(src, name), dst)
    return dst
