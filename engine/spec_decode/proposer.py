"""What a drafter gives the verify step, and how many tokens it may propose per sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence as Seq

import torch

from engine.sequence import Sequence


@dataclass
class Proposal:
    # Per sequence, its draft tokens (0 to k of them; a row may have none).
    token_ids: list[list[int]]
    # [B, k, V] draft probabilities after the rows' sampling processing (rejection.processed_probs),
    # for a model drafter; None for a drafter without probabilities (n-gram: q is one-hot).
    probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def as_tensors(self, device: torch.device | str, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft ids [B, k] padded with 0, counts [B]) for rejection.verify; k defaults to the longest."""
        k = max(self.num_tokens, default=0) if k is None else k
        rows = [t + [0] * (k - len(t)) for t in self.token_ids]
        ids = torch.tensor(rows, dtype=torch.int64).view(len(rows), k)
        counts = torch.tensor(self.num_tokens, dtype=torch.int64)
        return ids.to(device, non_blocking=True), counts.to(device, non_blocking=True)


class Proposer(Protocol):
    has_probs: bool  # whether propose() fills Proposal.probs

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
