"""Student initialisation from the teacher: keep a subset of its decoder layers."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from shrink.errors import ShrinkError


def parse_keep_layers(spec: Any, n_layers: int) -> list[int]:
    """`every:k` (0, k, 2k, ...), `first:n`, or an explicit list of layer indices."""
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        try:
            k = int(arg)
        except ValueError:
            raise ShrinkError(f"student.keep_layers={spec!r}: expected every:k, first:n or a list") from None
        if kind == "every" and k >= 1:
            layers = list(range(0, n_layers, k))
        elif kind == "first" and 1 <= k <= n_layers:
            layers = list(range(k))
        else:
            raise ShrinkError(f"student.keep_layers={spec!r}: expected every:k (k>=1) or first:n (1<=n<={n_layers})")
    else:
        layers = [int(i) for i in spec]
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= n_layers:
        raise ShrinkError(f"student.keep_layers={list(layers)}: need distinct indices in [0, {n_layers})")
    return sorted(layers)


def student_from_teacher(teacher: torch.nn.Module, keep: Sequence[int]) -> torch.nn.Module:
    """A deep copy of the teacher with only the decoder layers in `keep` (in order)."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        # The KV cache is indexed by layer_idx; it must follow the new numbering.
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    config = student.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def check_same_vocab(teacher_tok: Any, student_tok: Any) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ShrinkError("teacher and student tokenizers differ; logit distillation needs one vocabulary")
