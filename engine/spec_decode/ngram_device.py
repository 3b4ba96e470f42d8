"""Prompt lookup on the device: ngram.py's proposal for every row of a batch at once, in static-shaped
torch ops that a CUDA graph can hold, so that n-gram speculation can run several rounds per host trip
(rounds.py: a round's drafts come from the tokens the round before emitted, which never reach the host
in between).

Row b's context is ``hist[b, :lens[b]]``. As ``ngram.ngram_proposal`` (the reference and the spec): the
largest n in [min_n, max_n] whose n-gram ending at the context's last token also ends at an earlier
position e <= len - 2, and of those the most recent e; the proposal is what followed it,
``hist[b, e + 1 : e + 1 + k]``, ``count[b]`` tokens of it (fewer than k where the context ends first;
0 where nothing matches or the context is shorter than min_n + 1). ``drafts[b, count[b]:]`` is filler
(the row's last token): a verify that accepts a filler token accepts what the target itself chose, so
greedy output never depends on it.

The cost is max_n passes over [B, W] (W = hist's width, the longest context a row may reach), whatever
the rows' lengths: a few dozen small kernels, none of which reads a host value."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ngram_draft_device(hist: torch.Tensor, lens: torch.Tensor, min_n: int, max_n: int,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts [B, k] int64, count [B] int64) for contexts ``hist`` [B, W] (int64 token ids, any
    value past each row's length) of lengths ``lens`` [B] (clamped to 1..W)."""
    b, width = hist.shape
    hist = hist.to(torch.int64)
    length = lens.to(torch.int64).clamp(1, width)
    last = length - 1
    pos = torch.arange(width, device=hist.device)
    ends_ok = pos[None, :] <= (last - 1)[:, None]  # e <= len - 2
    # Leading matches of the context's suffix with the n-gram ending at each e: d = 0 .. max_n - 1.
    run = torch.ones(b, width, dtype=torch.bool, device=hist.device)
    matched = torch.zeros(b, width, dtype=torch.int64, device=hist.device)
    for d in range(max_n):
        shifted = F.pad(hist, (d, 0), value=-1)[:, :width]  # shifted[b, e] = hist[b, e - d], -1 before 0
        suffix = hist.gather(1, (last - d).clamp(min=0)[:, None])  # [B, 1]: the token d before the last
        suffix = torch.where((last - d >= 0)[:, None], suffix, torch.full_like(suffix, -2))
        run = run & (shifted == suffix)
        matched += run.to(torch.int64)
    matched = torch.where(ends_ok, matched, torch.zeros_like(matched))
    best = matched.max(dim=1).values  # [B]
    found = best >= min_n
    e = torch.where(matched == best[:, None], pos[None, :], torch.full_like(matched, -1)).max(dim=1).values
    start = (e + 1).clamp(min=0)
    idx = start[:, None] + torch.arange(k, device=hist.device)[None, :]
    drafts = hist.gather(1, idx.clamp(max=width - 1))
    count = torch.where(found, (length - start).clamp(0, k), torch.zeros_like(start))
    filler = hist.gather(1, last[:, None]).expand(b, k)
    keep = torch.arange(k, device=hist.device)[None, :] < count[:, None]
    return torch.where(keep, drafts, filler), count
