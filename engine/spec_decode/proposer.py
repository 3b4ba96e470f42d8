"""What a drafter gives the verify step, and how many tokens it may propose per sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence as Seq

import torch

from engine.layers.sampler import device_tensor
from engine.sequence import Sequence


@dataclass
class Proposal:
    # Per sequence, its draft tokens (0 to k of them; a row may have none), as host lists: a drafter
    # that works on the host (n-gram). None when they stay on the device (``ids``).
    token_ids: list[list[int]] | None
    # [B, k, V] draft probabilities after the rows' sampling processing (rejection.processed_probs),
    # for a model drafter; None for a drafter without probabilities (n-gram: q is one-hot).
    probs: torch.Tensor | None = None
    # A model drafter's tokens, left on the device, so that the verify reads them without a host
    # sync: [B, >= k] int64, row i's first counts[i] entries its drafts (the rest are ignored).
    ids: torch.Tensor | None = None
    counts: list[int] | None = None

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.ids is None) or (self.ids is None) != (self.counts is None):
            raise ValueError("a Proposal has host token_ids, or device ids with their counts")

    @property
    def num_tokens(self) -> list[int]:
        return list(self.counts) if self.counts is not None else [len(t) for t in self.token_ids]

    def host_token_ids(self) -> list[list[int]]:
        """The draft tokens as host lists (for device ids, a transfer that waits for the device)."""
        if self.token_ids is not None:
            return self.token_ids
        return [row[:n] for row, n in zip(self.ids.tolist(), self.counts)]

    def as_tensors(self, device: torch.device | str, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft ids [B, k], counts [B]) on ``device`` for rejection.verify, without a sync; k
        defaults to the longest. Entries past a row's count are padding (0 for host lists)."""
        k = max(self.num_tokens, default=0) if k is None else k
        counts = device_tensor(self.num_tokens, device, torch.int64)
        if self.ids is not None:
            return self.ids[:, :k], counts
        rows = [t + [0] * (k - len(t)) for t in self.token_ids]
        return device_tensor(rows, device, torch.int64).view(len(rows), k), counts


class Proposer(Protocol):
    has_probs: bool  # whether propose() fills Proposal.probs
    # (Optional, False when absent) needs_hidden: the verify forward hands its hidden rows to the
    # proposer's keep_features after acceptance (Medusa, medusa.py).

    def propose(self, seqs: Seq[Sequence], k: int | Seq[int]) -> Proposal:
        """Draft tokens for each sequence (at most its k; see ``draft_limit``). A model drafter keeps
        its own KV cache in step with the sequences' token ids."""
        ...


def per_sequence_k(seqs: Seq[Sequence], k: int | Seq[int]) -> list[int]:
    ks = [k] * len(seqs) if isinstance(k, int) else list(k)
    if len(ks) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(ks)} draft lengths")
    return ks


def draft_limit(seq: Sequence, k: int, max_model_len: int) -> int:
    """Draft tokens worth proposing for ``seq``: a verify step emits up to n + 1 tokens (the accepted
    drafts and the target's own), so n + 1 stays within what max_tokens and max_model_len still
    allow; then every K/V position it writes (len - 1 .. len - 1 + n) is below max_model_len too."""
    room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens)
    return max(0, min(k, room - 1))
