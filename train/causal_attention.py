"""Unpadded training forwards through SDPA's causal kernel without transformers' mask preparation.

For a batch with no attention mask, transformers (create_causal_mask) looks for packed sequences in
the position ids and branches on the answer (`(...).all()` in find_packed_sequence_indices): a read
of the device in every forward, which on a GPU waits for everything queued before it (the student's
forward, when the teacher's starts). Its answer for our blocks is always "one sequence per row", and
the mask it then builds is None, so SDPA runs with is_causal=True. Under an attention name that
has no mask function transformers skips the preparation and passes no mask, so SDPA runs the same
causal kernel on the same inputs without the read. Only for models whose mask is plain causal: a
sliding window, chunked attention or a non-causal config keeps transformers' masks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

CAUSAL_SDPA = "shrink_causal_sdpa"


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if CAUSAL_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def unmasked_causal(config, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """While it lasts, a model with this config (SDPA, no attention mask) runs its attention as
    CAUSAL_SDPA; any other case is left alone. The config's name is restored on exit, so nothing
    saved afterwards carries ours."""
    if attention_mask is not None or config._attn_implementation != "sdpa" or not plain_causal(config):
        yield
        return
    _register()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def plain_causal(config) -> bool:
    """Whether the model's attention mask is the causal triangle alone (no window, chunks or bidirection)."""
    return (getattr(config, "is_causal", True) and getattr(config, "sliding_window", None) is None
            and getattr(config, "attention_chunk_size", None) is None
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or []))
