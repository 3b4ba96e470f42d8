"""Token sampling for a batch where every row has its own SamplingParams.

Greedy rows take the argmax. Other rows: temperature, then top-k, top-p and min-p filters, then a
draw by the exponential race (argmax of p / E with E ~ Exp(1)), which equals sampling from p and
lets rows with a per-request seed draw their noise from their own generator. Logprobs reported
are those of the model (log_softmax of the raw logits), as in vLLM.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Logprob, TokenLogprobs


def _filter(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    use_top_k_p: bool, use_min_p: bool,
) -> torch.Tensor:
    """logits: [n, vocab] already temperature-scaled; per-row filter values (top_k 0 = off). The
    two flags are decided on the host, so that filtering never waits for the GPU."""
    vocab = logits.shape[-1]
    if use_top_k_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        remove = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        cum_before = probs.cumsum(dim=-1) - probs
        remove |= cum_before >= top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits: [n, vocab] float32. Returns [n] token ids (on logits' device)."""
    n = logits.shape[0]
    device = logits.device
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):  # decided on the host: no device sync
        return tokens
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device, dtype=logits.dtype)
    top_k = torch.tensor([max(p.top_k, 0) for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
    use_top_k_p = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    scaled = _filter(logits / temps[:, None], top_k, top_p, min_p, use_top_k_p, use_min_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None and not params[i].greedy:
            noise[i] = torch.empty(probs.shape[1], device=device, dtype=probs.dtype).exponential_(generator=g)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, tokens, drawn)


def token_logprobs(logprobs_row: torch.Tensor, chosen: int, top_n: int) -> TokenLogprobs:
    """The chosen token's logprob and rank, plus the top-n entries, from one row of log_softmax."""
    out: TokenLogprobs = {}
    chosen_lp = float(logprobs_row[chosen])
    rank = int((logprobs_row > chosen_lp).sum()) + 1
    if top_n > 0:
        values, idx = logprobs_row.topk(top_n)
        for r, (v, t) in enumerate(zip(values.tolist(), idx.tolist()), start=1):
            out[t] = Logprob(t, v, r)
    out[chosen] = Logprob(chosen, chosen_lp, rank)
    return out
