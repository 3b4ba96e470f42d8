"""The per-step attention metadata, set by the model runner before a forward and read by the
attention layers, so that a model's ``forward(input_ids, positions)`` stays plain. Engine constants
are not here: they reach the layers at construction (engine/layers/options.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    is_prefill: bool = False
    # Flat slot index (block_id * block_size + offset) of each input token; -1 means "do not store".
    slot_mapping: torch.Tensor | None = None
    # Decode: [batch] context length including the new token; [batch, max_blocks] block tables.
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    # Prefill, as host ints: per sequence, tokens computed now and total context after this step.
    query_lens: list[int] = field(default_factory=list)
    context_lens_host: list[int] = field(default_factory=list)
    # Prefill through the Triton varlen kernel: set with context_lens and block_tables.
    cu_query_lens: torch.Tensor | None = None
    max_query_len: int = 0
    # A speculative verify through multi-query decode attention (kernels/verify_attention.py): each
    # sequence's query is at most this many tokens, the last of its context. Prefill layout: one
    # sequence per entry of context_lens (cu_query_lens); decode pseudo-rows: exactly this many rows
    # per sequence, each with the sequence's block table and its own context length.
    verify_query_len: int = 0
    # Decode: [batch] int64, per row the first position this forward stores (the newest; a verify's
    # pseudo-row: its chunk's first): the decode attention reads those only after waiting for the
    # store (programmatic dependent launch). None: the newest.
    first_new: torch.Tensor | None = None


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
