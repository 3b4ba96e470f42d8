"""min_tokens in a speculative step: stop tokens are impossible at output positions below a
request's min_tokens, in the draft's logits and the target's alike (engine/layers/sampler.py does
the same for a plain step), so the verified tokens are those a plain decode would give."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.layers.sampler import device_tensor
from engine.sequence import Sequence


def ban_stop_tokens(logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: set[int] | frozenset[int],
                    first: int = 0) -> torch.Tensor:
    """logits [B, n, V]: row i's position j is output token num_output_tokens + first + j. Returns
    ``logits`` itself when no position is below its min_tokens, else a masked copy."""
    out = logits
    n = logits.shape[1]
    for i, seq in enumerate(seqs):
        below = seq.params.min_tokens - seq.num_output_tokens - first  # positions j < below are banned
        if below <= 0:
            continue
        banned = sorted(set(seq.params.stop_token_ids) | set(eos_token_ids))
        if banned:
            if out is logits:
                out = logits.clone()
            # index_fill_ with a device index: a list index would be copied to the device with a sync.
            out[i, : min(below, n)].index_fill_(-1, device_tensor(banned, logits.device, torch.int64), float("-inf"))
    return out
