"""Verification of draft tokens: batched rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

Row i proposed ``num_draft[i]`` tokens x_0..x_{n-1} (padded to k) from draft distributions q_j; the
target scored all k+1 positions (p_0..p_k). Draft token j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)), in order, until the first rejection. At the first rejected position j
one token is drawn from the residual max(0, p_j - q_j) / sum(...); when all n are accepted, a bonus
token is drawn from p_n. Every emitted token is then distributed exactly as the target's (the
acceptance proof of both papers), so sampling is lossless. A drafter without probabilities (n-gram)
has a one-hot q: accept with probability p(x), residual p with x removed.

Greedy rows compare the draft with the target's argmax and emit the target's argmax after the
matching prefix: their tokens equal those of decoding without a draft, token for token.

Both distributions go through the same temperature, top-k, top-p and min-p processing
(``processed_probs``), as vLLM does. A seeded request takes each uniform from the counter of its
output position and the kind of draw (sampler.SeededRows, whose docstring says why that stays
lossless). Nothing here waits for the device: results stay tensors and the caller brings them back
with one transfer (``VerifiedTokens.to_lists``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from engine.layers.sampler import DRAW_ACCEPT, SeededRows, check_seeded, device_tensor, draw, filter_logits
from engine.sampling_params import SamplingParams

PLACEHOLDER = -1  # token_ids entries past a row's emitted tokens


@dataclass
class VerifiedTokens:
    # [B, k+1] int64: row i's first num_accepted[i] + 1 entries are the tokens it emits (accepted
    # draft tokens, then one corrected or bonus token); the rest are PLACEHOLDER.
    token_ids: torch.Tensor
    num_accepted: torch.Tensor  # [B] int64: draft tokens accepted

    def to_lists(self) -> list[list[int]]:
        """Per row, its emitted tokens; the only device-to-host transfer of a verify step."""
        rows = torch.cat([self.num_accepted[:, None], self.token_ids], dim=1).tolist()
        return [row[1 : row[0] + 2] for row in rows]


def processed_probs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """[B, n, V] logits -> [B, n, V] float32 probabilities after row i's temperature, top-k, top-p and
    min-p (engine/layers/sampler.py's filters). Greedy rows get the plain softmax (unused: greedy
    verification reads the argmax of the logits)."""
    b, n, v = logits.shape
    device = logits.device
    flat = logits.reshape(b * n, v).float()
    temps = device_tensor([p.temperature if not p.greedy else 1.0 for p in params], device)
    top_k = device_tensor([max(p.top_k, 0) for p in params], device)
    top_p = device_tensor([p.top_p for p in params], device)
    min_p = device_tensor([p.min_p for p in params], device)
    use_top_k_p = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    scaled = filter_logits(flat / temps.repeat_interleave(n)[:, None], top_k.repeat_interleave(n),
                     top_p.repeat_interleave(n), min_p.repeat_interleave(n), use_top_k_p, use_min_p)
    return scaled.softmax(dim=-1).view(b, n, v)


def _accepted_prefix(ok: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """[B, k] per-position acceptance -> [B] length of the accepted prefix within each row's proposals."""
    valid = torch.arange(ok.shape[1], device=ok.device)[None, :] < num_draft[:, None]
    return (ok & valid).to(torch.int64).cumprod(dim=1).sum(dim=1)


def _assemble(draft: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> VerifiedTokens:
    """Accepted draft prefix, then ``last`` at position num_accepted, PLACEHOLDER after."""
    b, k = draft.shape
    pos = torch.arange(k + 1, device=draft.device)[None, :]
    padded = torch.cat([draft, last[:, None]], dim=1)
    out = torch.where(pos < num_accepted[:, None], padded, torch.full_like(padded, PLACEHOLDER))
    out.scatter_(1, num_accepted[:, None], last[:, None])
    return VerifiedTokens(out, num_accepted)


def greedy_agreement(draft: Seq[int], target: Seq[int]) -> int:
    """The host's greedy acceptance: how many leading draft tokens equal the target's tokens at
    the same positions (greedy_verify's accepted prefix, for token lists)."""
    n = min(len(draft), len(target))
    a = 0
    while a < n and draft[a] == target[a]:
        a += 1
    return a


def greedy_verify(
    draft_token_ids: torch.Tensor, num_draft: torch.Tensor, target_argmax: torch.Tensor
) -> VerifiedTokens:
    """draft [B, k], num_draft [B], target argmax [B, k+1]: accept while the draft equals the argmax,
    then emit the argmax at the first mismatch (or at position num_draft)."""
    k = draft_token_ids.shape[1]
    a = _accepted_prefix(draft_token_ids == target_argmax[:, :k], num_draft)
    last = target_argmax.gather(1, a[:, None]).squeeze(1)
    return _assemble(draft_token_ids, a, last)


def _acceptance_uniforms(b: int, k: int, device: torch.device, seeded: SeededRows | None) -> torch.Tensor:
    """[B, k] float64 uniforms for the acceptance tests: a seeded row's proposal j takes its (position
    + j, DRAW_ACCEPT) uniform, so its tokens do not depend on the rest of the batch (float64: cast to
    fp32, a uniform just below 1 would round to 1)."""
    u = torch.rand(b, k, device=device, dtype=torch.float64)
    if seeded is None:
        return u
    return seeded.put(u, seeded.uniforms(DRAW_ACCEPT, torch.arange(k, device=device)[None, :]))


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    seeded: SeededRows | None = None,
) -> VerifiedTokens:
    """draft [B, k] (entries past num_draft[i] ignored), num_draft [B] int64, target_probs [B, k+1, V],
    draft_probs [B, k, V] or None for a drafter without probabilities (one-hot q). Probabilities
    must be processed already (``processed_probs``). ``seeded``: the rows with a seed, at the output
    position of their first proposal."""
    b, k = draft_token_ids.shape
    v = target_probs.shape[-1]
    device = target_probs.device
    rows = torch.arange(b, device=device)
    if k == 0:
        zero = torch.zeros(b, dtype=torch.int64, device=device)
        return _assemble(draft_token_ids, zero, draw(target_probs[:, 0], seeded))
    u = _acceptance_uniforms(b, k, device, seeded)
    x = draft_token_ids.clamp(0, v - 1)  # padding may hold anything
    p_x = target_probs[:, :k].gather(2, x[..., None]).squeeze(-1)
    q_x = draft_probs.gather(2, x[..., None]).squeeze(-1) if draft_probs is not None else torch.ones_like(p_x)
    # u in [0, 1): P(u * q < p) = min(1, p / q); strict, so a token the target excludes is never accepted.
    a = _accepted_prefix(u * q_x < p_x, num_draft)
    p_a = target_probs[rows, a]  # [B, V]: the target at the first position not accepted
    j = a.clamp(max=k - 1)
    if draft_probs is not None:
        q_a = draft_probs[rows, j]
    else:  # one-hot at the proposal (not F.one_hot: its range check syncs with the device)
        q_a = torch.zeros_like(p_a).scatter_(1, x[rows, j][:, None], 1.0)
    residual = (p_a - q_a).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass 0 means p_a == q_a there, where rejection has probability 0: any fallback is unreachable.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_a)
    dist = torch.where((a < num_draft)[:, None], residual, p_a)
    return _assemble(draft_token_ids, a, draw(dist, seeded, offsets=a))  # the token at position a


def verify(
    draft_token_ids: torch.Tensor,
    num_draft: torch.Tensor,
    target_logits: torch.Tensor,
    params: Seq[SamplingParams],
    draft_probs: torch.Tensor | None = None,
    seeded: SeededRows | None = None,
) -> VerifiedTokens:
    """One verify step for a batch mixing greedy and sampling rows. target_logits [B, k+1, V] are the
    target's raw (fp32) logits at the k+1 positions; draft_probs [B, k, V] the drafter's processed
    probabilities (None: one-hot, e.g. n-gram); ``seeded`` as for rejection_sample. Greedy rows take
    the argmax of the raw logits, as the plain sampler does; which path runs is decided from
    ``params`` on the host."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        return greedy_verify(draft_token_ids, num_draft, target_logits.argmax(dim=-1))
    check_seeded(params, seeded)
    sampled = rejection_sample(draft_token_ids, num_draft, processed_probs(target_logits, params), draft_probs,
                               seeded)
    if not any(greedy):
        return sampled
    exact = greedy_verify(draft_token_ids, num_draft, target_logits.argmax(dim=-1))
    mask = device_tensor(greedy, target_logits.device)
    return VerifiedTokens(torch.where(mask[:, None], exact.token_ids, sampled.token_ids),
                          torch.where(mask, exact.num_accepted, sampled.num_accepted))
