"""Tensor-parallel layers, after Megatron-LM: a column-parallel linear is a plain ``nn.Linear`` over
this rank's output rows (q/k/v heads, gate/up channels); these are the layers whose outputs the
ranks combine.

- RowParallelLinear: this rank's input columns; the partial products are summed by one all-reduce
  (the bias added on rank 0 only, before it). RowParallelCompressed: the same around a compressed
  linear (engine/layers/quantized.py) of this rank's columns, whose bias only rank 0 holds.
- VocabParallelEmbedding: this rank's vocabulary rows; ids outside them give zeros, and one
  all-reduce sums the ranks' rows into every token's embedding.
- ParallelLMHead: this rank's vocabulary rows of the output layer; an all-gather puts every rank's
  logits side by side, so that every rank holds the full logits (the multi-step decode takes the
  argmax on the device of every rank, in lock step, with no further message).

The vocabulary is split in equal shards of ceil(vocab / ranks) rows; the last shard's padding rows
are zero and their logits are cut off after the gather. With one rank all three are the plain
layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import decode_gemv

from engine.layers.quantized import gemv_weight
from engine.parallel.group import all_gather_columns, all_reduce


def shard_range(size: int, rank: int, ranks: int) -> range:
    """Rank ``rank``'s part of ``size`` items split evenly over ``ranks`` (EngineConfig refuses a
    ``size`` they do not divide)."""
    if size % ranks:
        raise ValueError(f"{size} heads or channels cannot be split evenly over {ranks} tensor-parallel ranks")
    part = size // ranks
    return range(rank * part, (rank + 1) * part)


def vocab_range(vocab: int, rank: int, ranks: int) -> range:
    """Rank ``rank``'s vocabulary rows: shards of ceil(vocab / ranks), the last one cut short."""
    part = math.ceil(vocab / ranks)
    return range(min(rank * part, vocab), min((rank + 1) * part, vocab))


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0) -> None:
        """``in_features``: this rank's input columns; the bias is added on rank 0 only."""
        super().__init__(in_features, out_features, bias=bias)
        self.tp_rank = tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None))


class RowParallelCompressed(nn.Module):
    def __init__(self, local: nn.Module) -> None:
        """``local``: a compressed linear over this rank's input columns, with the bias on rank 0
        only (the loader gives the other ranks' none)."""
        super().__init__()
        self.local = local

    @property
    def bias(self) -> torch.Tensor | None:
        return self.local.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local(x))


def row_parallel_gemv_add(linear: nn.Module, x: torch.Tensor, h: torch.Tensor, tp_rank: int,
                          pdl: bool, batch_invariant: bool = False) -> torch.Tensor:
    """h += x @ W.T + b of a row-parallel linear, in place, in the fused decode path: one GEMV
    launch and one all-reduce. Rank 0's GEMV adds the residual h and the bias in its epilogue; the
    other ranks' write their partial product over h, so the all-reduce adds the residual once. (The
    GEMV's residual epilogue cannot come after the all-reduce; this keeps the launch it saves.)
    ``batch_invariant``: the GEMV's batch-invariant launch (kernels/gemv.py; one rank)."""
    weight, quant = gemv_weight(linear.local if isinstance(linear, RowParallelCompressed) else linear)
    lead = tp_rank == 0
    decode_gemv.gemv(x, weight, linear.bias if lead else None, **quant, residual=h if lead else None, out=h,
                      pdl=pdl, batch_invariant=batch_invariant)
    return all_reduce(h)  # a no-op on one rank


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab: int, hidden: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(math.ceil(vocab / tp_size), hidden)
        self.tp_size = tp_size
        rows = vocab_range(vocab, tp_rank, tp_size)
        self.start, self.num_rows = rows.start, len(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    def __init__(self, hidden: int, vocab: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hidden, math.ceil(vocab / tp_size), bias=False)
        self.vocab, self.tp_size = vocab, tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        full = all_gather_columns(logits)
        return full if full.shape[1] == self.vocab else full[:, : self.vocab].contiguous()
