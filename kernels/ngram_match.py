"""Prompt lookup on the device: engine/spec_decode/ngram.py's proposal for every row of a batch at once,
in one launch a CUDA graph can hold, so that n-gram speculation can run several rounds per host trip
(engine/spec_decode/rounds.py: a round's drafts come from the tokens the round before emitted, which
never reach the host in between).

Row b's context is ``hist[b, :lens[b]]``. As ``ngram.ngram_proposal`` (the reference and the spec): the
largest n in [min_n, max_n] whose n-gram ending at the context's last token also ends at an earlier
position e <= len - 2, and of those the most recent e; the proposal is what followed it,
``hist[b, e + 1 : e + 1 + k]``, ``count[b]`` tokens of it (fewer than k where the context ends first;
0 where nothing matches or the context is shorter than min_n + 1). ``drafts[b, count[b]:]`` is filler
(the row's last token): a verify that accepts a filler token accepts what the target itself chose, so
greedy output never depends on it.

``ngram_match_ref`` (torch, static shapes: max_n passes over [B, W], W = hist's width, the longest
context a row may reach; about thirty small launches) is the reference; ``ngram_match`` is one program
per row scanning its context BLOCK positions at a time, latest-best kept across blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, next_pow2, tl, triton

BLOCK = 512  # context positions a program compares at once


def ngram_match_ref(hist: torch.Tensor, lens: torch.Tensor, min_n: int, max_n: int,
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


if HAS_TRITON:

    @triton.jit
    def _ngram_match_kernel(hist_ptr, lens_ptr, drafts_ptr, count_ptr, width, stride,
                            MIN_N: tl.constexpr, MAX_N: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = hist_ptr + row.to(tl.int64) * stride
        length = tl.minimum(tl.maximum(tl.load(lens_ptr + row).to(tl.int64), 1), width)
        last = length - 1
        best = tl.full([], 0, tl.int64)
        best_e = tl.full([], -1, tl.int64)
        offs = tl.arange(0, BLOCK).to(tl.int64)
        for e0 in range(0, width, BLOCK):
            e = e0 + offs
            run = e <= last - 1  # ends strictly before the last token
            matched = tl.zeros([BLOCK], tl.int64)
            for d in tl.static_range(MAX_N):
                # the context's token d before its last (-2, equal to nothing, before its start)
                s = tl.where(last - d >= 0, tl.load(base + tl.maximum(last - d, 0)), -2)
                run = run & (e - d >= 0)
                x = tl.load(base + e - d, mask=run, other=-1)
                run = run & (x == s)
                matched += run.to(tl.int64)
            m = tl.max(matched, 0)
            at = tl.max(tl.where(matched == m, e, -1), 0)  # the latest end with this block's best
            take = (m > best) | ((m == best) & (at > best_e))  # a later block's equal match is more recent
            best_e = tl.where(take, at, best_e)
            best = tl.where(take, m, best)
        start = tl.maximum(best_e + 1, 0)
        count = tl.where(best >= MIN_N, tl.minimum(tl.maximum(length - start, 0), K), 0)
        i = tl.arange(0, BLOCK_K).to(tl.int64)
        tok = tl.load(base + tl.minimum(start + i, width - 1), mask=i < K, other=0)
        filler = tl.load(base + last)
        tl.store(drafts_ptr + row.to(tl.int64) * K + i, tl.where(i < count, tok, filler), mask=i < K)
        tl.store(count_ptr + row, count)


def ngram_match(hist: torch.Tensor, lens: torch.Tensor, min_n: int, max_n: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ngram_match_ref in one launch (Triton): the same drafts and counts."""
    b, width = hist.shape
    hist = hist.contiguous().to(torch.int64)
    drafts = torch.empty(b, k, dtype=torch.int64, device=hist.device)
    count = torch.empty(b, dtype=torch.int64, device=hist.device)
    if b:
        _ngram_match_kernel[(b,)](hist, lens.contiguous(), drafts, count, width, hist.stride(0), MIN_N=min_n,
                                  MAX_N=max_n, K=k, BLOCK_K=next_pow2(max(k, 1)), BLOCK=min(BLOCK, next_pow2(width)))
    return drafts, count
