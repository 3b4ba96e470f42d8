"""One draft step's token and probabilities per row, on the device.

A model drafter samples each proposal from its own processed distribution q (the same temperature,
top-k, top-p and min-p as the target's, rejection.processed_probs) and keeps q for the verify step.
Greedy rows take the argmax of the raw logits, as the plain sampler does, so that a greedy draft
agrees with the target whenever the two models agree. Sampled rows draw as the plain sampler does
(sampler.draw): a seeded request's proposal at output position t from its (t, DRAW_DRAFT) uniform
(sampler.SeededRows), the other rows by the exponential race. Nothing here waits for the device:
the k steps of a draft run back to back. A draft vocabulary's logits are -inf outside it, so q is
the softmax over the subset, exactly zero elsewhere (draft_vocab.py).
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.layers.sampler import DRAW_DRAFT, SeededRows, check_seeded, device_tensor, draw
from engine.sampling_params import SamplingParams
from engine.spec_decode.rejection import processed_probs


def sample_draft(
    logits: torch.Tensor, params: Seq[SamplingParams], seeded: SeededRows | None = None, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] (fp32, or the model's dtype: q is fp32 either way) -> (tokens [B], q [B, V] or
    None when every row is greedy: greedy verification never reads q). ``seeded``: the rows with a
    seed, whose proposals are those of their positions plus ``offset`` (a drafter's step)."""
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return tokens, None
    check_seeded(params, seeded)
    q = processed_probs(logits[:, None], params)[:, 0]
    drawn = draw(q, seeded, DRAW_DRAFT, offset)
    greedy = device_tensor([p.greedy for p in params], logits.device)
    return torch.where(greedy, tokens, drawn), q
