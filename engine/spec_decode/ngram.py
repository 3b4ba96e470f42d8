"""Prompt-lookup (n-gram) drafting, no model: the continuation of an earlier occurrence of the
sequence's last n tokens, searched in prompt + output.

n runs from prompt_lookup_max down to prompt_lookup_min; the first n with an earlier occurrence
wins, and of its occurrences the most recent. The proposal is the up to k tokens that followed it
(fewer where the context ends first: an occurrence that overlaps the suffix proposes what is left).

The search is one vectorised pass: the positions holding the last token are the only candidates;
each candidate's match length is grown backwards, one comparison per n, over the candidates only.
Cost O(L + candidates * max_n) per sequence for a context of L tokens.
"""

from __future__ import annotations

from typing import Sequence as Seq

import numpy as np

from engine.sequence import Sequence
from engine.spec_decode.proposer import Proposal, per_sequence_k


def ngram_proposal(context: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens proposed for ``context`` (1-D int array); empty when nothing matches."""
    length = len(context)
    if k <= 0 or length < min_n + 1:
        return context[:0]
    last = length - 1
    ends = np.flatnonzero(context[:last] == context[last])  # last index of each earlier occurrence
    if ends.size == 0:
        return context[:0]
    matched = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for d in range(1, min(max_n, last + 1)):
        before = ends - d
        alive &= before >= 0
        alive[alive] = context[before[alive]] == context[last - d]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return context[:0]
    start = int(ends[np.flatnonzero(matched == best)[-1]]) + 1  # the most recent occurrence
    return context[start : start + k]


class NgramProposer:
    """The Proposer of ``{"method": "ngram", ...}``: host-side, no draft probabilities.

    Each sequence's tokens are kept as a numpy array that grows by the tokens appended since the
    last call (converting a whole 8k-token list costs ~45x the search itself). A sequence's tokens
    only ever grow in the engine; a shorter or unseen one is converted afresh. Arrays of sequences
    absent from a call are dropped, so finished sequences leave nothing behind."""

    has_probs = False

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min/max: need 1 <= {prompt_lookup_min} <= {prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._tokens: dict[int, tuple[np.ndarray, int]] = {}  # seq_id -> (buffer, tokens in it)

    def _context(self, seq: Sequence) -> np.ndarray:
        ids = seq.token_ids
        buf, n = self._tokens.get(seq.seq_id, (None, 0))
        if buf is None or n > len(ids):
            buf, n = np.empty(max(64, 2 * len(ids)), dtype=np.int64), 0
        if len(ids) > len(buf):
            grown = np.empty(2 * len(ids), dtype=np.int64)
            grown[:n] = buf[:n]
            buf = grown
        if len(ids) > n:
            buf[n : len(ids)] = ids[n:]
        self._tokens[seq.seq_id] = (buf, len(ids))
        return buf[: len(ids)]

    def proposal_before(self, seq: Sequence, num_new: int, k: int) -> list[int]:
        """What propose() would have drafted for ``seq`` (up to k tokens) before its latest
        ``num_new`` tokens: a round that a plain decode step ran instead, for the auto policy."""
        context = self._context(seq)[: len(seq.token_ids) - num_new]
        return ngram_proposal(context, self.min_n, self.max_n, k).tolist()

    def propose(self, seqs: Seq[Sequence], k: int | Seq[int]) -> Proposal:
        ks = per_sequence_k(seqs, k)
        out = [ngram_proposal(self._context(seq), self.min_n, self.max_n, n).tolist() for seq, n in zip(seqs, ks)]
        live = {seq.seq_id for seq in seqs}
        for seq_id in [s for s in self._tokens if s not in live]:
            del self._tokens[seq_id]
        return Proposal(out)
