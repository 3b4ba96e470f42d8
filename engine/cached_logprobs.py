"""The prompt logprobs of one cached block, kept compactly beside its K/V (block_manager.py).

A prompt-logprob entry for position p (the logprob and rank of token p, and the top-n tokens at p)
depends only on tokens 0..p, so a full block whose hash chain covers tokens 0..p can hold the entries
of its positions for any later request with the same prefix. They are stored as tensors (about
``block_size * (8 * top_n + 8)`` bytes), not as the dicts the request returns, and rebuilt with any
top-n up to the one they were computed with: the first k of the top-n, then the prompt token, in
the order ``LogprobRows`` builds them (layers/sampler.py)."""

from __future__ import annotations

import torch

from engine.sequence import Logprob, TokenLogprobs


class CachedLogprobs:
    __slots__ = ("top_n", "first_is_none", "top_ids", "top_logprobs", "logprobs", "ranks")

    def __init__(self, entries: list[TokenLogprobs | None], tokens: list[int], top_n: int) -> None:
        """``entries[j]``: the entry of ``tokens[j]``, holding its top-``top_n`` first; only the
        sequence's first position has None."""
        self.top_n = top_n
        self.first_is_none = entries[0] is None
        rows = entries[1:] if self.first_is_none else entries
        top = [list(e.values())[:top_n] for e in rows]
        shape = (len(rows), top_n)
        self.top_ids = torch.tensor([[lp.token_id for lp in t] for t in top], dtype=torch.int32).view(shape)
        self.top_logprobs = torch.tensor([[lp.logprob for lp in t] for t in top], dtype=torch.float32).view(shape)
        chosen = [e[t] for e, t in zip(rows, tokens[len(tokens) - len(rows):])]
        self.logprobs = torch.tensor([lp.logprob for lp in chosen], dtype=torch.float32)
        self.ranks = torch.tensor([lp.rank for lp in chosen], dtype=torch.int32)

    def entries(self, tokens: list[int], top_n: int) -> list[TokenLogprobs | None]:
        """The block's entries for its ``tokens`` with ``top_n`` (<= the stored top-n)."""
        assert top_n <= self.top_n
        out: list[TokenLogprobs | None] = [None] if self.first_is_none else []
        ids, values = self.top_ids[:, :top_n].tolist(), self.top_logprobs[:, :top_n].tolist()
        rows = zip(ids, values, self.logprobs.tolist(), self.ranks.tolist(), tokens[len(out):])
        for top_ids, top_values, logprob, rank, token in rows:
            entry: TokenLogprobs = {t: Logprob(t, v, r) for r, (t, v) in enumerate(zip(top_ids, top_values), start=1)}
            entry[token] = Logprob(token, logprob, rank)
            out.append(entry)
        return out
