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
    # Counted tokens (labels != -100) per row, on the host: counted while the labels are still there,
    # so a batch on a GPU is counted without reading the device (a sync that stalls the step).
    row_tokens: list[int] | None = None

    def to(self, device: torch.device) -> "Batch":
        """On the device; from the CPU to a GPU through pinned memory without blocking (a blocking copy
        waits for every queued kernel, so the host could not queue the next step while this one runs)."""
        device = torch.device(device)
        row_tokens = self.row_tokens
        if row_tokens is None and self.labels.device.type == "cpu":
            row_tokens = (self.labels != -100).sum(dim=1).tolist()
        return Batch(to_device(self.input_ids, device), to_device(self.labels, device),
                     to_device(self.attention_mask, device) if self.attention_mask is not None else None, self.groups,
                     row_tokens)

    def counted_tokens(self, rows: slice = slice(None)) -> int:
        """Tokens that count (labels != -100) in `rows`; no device read when the batch came from the host."""
        if self.row_tokens is not None:
            return sum(self.row_tokens[rows])
        return int((self.labels[rows] != -100).sum())

    @property
    def num_tokens(self) -> int:
        return self.counted_tokens()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to a GPU through pinned memory without blocking (a blocking
    copy waits for every kernel queued before it)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
        return Batch(ids, ids[:, 1:], None, [("lm", slice(0, ids.shape[0]), 1.0)],
                     [ids.shape[1] - 1] * ids.shape[0])


def as_train_data(data: "torch.Tensor | TrainData") -> TrainData:
    return PackedBlocks(data) if isinstance(data, torch.Tensor) else data


def lm_batch(ids: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """A batch over already-built sequences (e.g. generated ones), labels default to the next tokens."""
    labels = ids[:, 1:] if labels is None else labels
    return Batch(ids, labels, None, [("lm", slice(0, ids.shape[0]), 1.0)])
