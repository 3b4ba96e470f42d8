"""What one training step sees: token ids, an optional attention mask, shifted labels, and named
row groups with their weight in the total loss (multi-task rationale batches have two).

Training data is either a packed LM tensor [n_blocks, block_size] (wrapped in `PackedBlocks`) or
any object with the same two methods (see `train.rationale.MultiTaskExamples`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor                      # [B, T]
    labels: torch.Tensor                         # [B, T-1]: the target of position t is labels[:, t]
    attention_mask: torch.Tensor | None = None   # [B, T], 1 for real tokens (right padding)
    groups: list[tuple[str, slice, float]] = field(default_factory=list)  # (name, rows, weight)

    def to(self, device: torch.device) -> "Batch":
        am = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.labels.to(device), am, self.groups)

    @property
    def num_tokens(self) -> int:
        return int((self.labels != -100).sum())


class TrainData(Protocol):
    def __len__(self) -> int: ...

    def collate(self, indices: torch.Tensor) -> Batch: ...


class PackedBlocks:
    """Fixed-length LM blocks: every next token counts, one group of weight 1."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def collate(self, indices: torch.Tensor) -> Batch:
        ids = self.blocks[indices]
        return Batch(ids, ids[:, 1:], None, [("lm", slice(0, ids.shape[0]), 1.0)])


def as_train_data(data: "torch.Tensor | TrainData") -> TrainData:
    return PackedBlocks(data) if isinstance(data, torch.Tensor) else data


def lm_batch(ids: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """A batch over already-built sequences (e.g. generated ones), labels default to the next tokens."""
    labels = ids[:, 1:] if labels is None else labels
    return Batch(ids, labels, None, [("lm", slice(0, ids.shape[0]), 1.0)])
