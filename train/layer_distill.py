"""Intermediate-layer distillation: match student hidden states to mapped teacher hidden states.

A layer map says "student layer i <- teacher layer j": the OUTPUT of student decoder layer i is
pulled towards the output of teacher decoder layer j, by MSE or cosine distance per token. When
widths differ, a learned linear projection (student width -> teacher width, one per mapped layer)
sits in between; it trains with the student and is discarded afterwards.

States are captured with forward hooks on the decoder layers (not `output_hidden_states`), so only
the mapped layers are kept and the meaning of "layer j" does not depend on how a transformers
version orders its hidden-state tuple (some append the final norm's output last).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SettingError
from train.config import LAYER_LOSSES


@dataclass(frozen=True)
class LayerPair:
    student: int
    teacher: int
    weight: float = 1.0


def auto_layer_map(keep: Sequence[int], n_teacher: int) -> list[LayerPair]:
    """For a student made of teacher layers `keep`: student layer i ends where the teacher's layer
    just before the next kept one ends (the last student layer ends with the teacher's last)."""
    keep = sorted(keep)
    ends = [nxt - 1 for nxt in keep[1:]] + [n_teacher - 1]
    return [LayerPair(i, j) for i, j in enumerate(ends)]


def parse_layer_map(spec: Any, n_student: int, n_teacher: int, keep: Sequence[int] | None = None
                    ) -> list[LayerPair]:
    """`auto` (needs `keep`), `{student: teacher}`, or a list of [student, teacher(, weight)]; a bad
    spec is a SettingError of the setting `layer_map`."""
    if spec is None or spec == [] or spec == {}:
        return []
    if isinstance(spec, str):
        if spec != "auto":
            raise SettingError("layer_map", f"{spec!r}: expected auto, a mapping student->teacher, or a list of pairs",
                               sep="=")
        if keep is None:
            raise SettingError("layer_map", "auto needs a student made of teacher layers (student.init=teacher_layers)",
                               sep="=")
        pairs = auto_layer_map(keep, n_teacher)
    elif isinstance(spec, dict):
        pairs = [LayerPair(int(s), int(t)) for s, t in spec.items()]
    else:
        pairs = []
        for entry in spec:
            entry = list(entry)
            if len(entry) not in (2, 3):
                raise SettingError("layer_map",
                                   f"entry {entry} is not [student, teacher] or [student, teacher, weight]")
            pairs.append(LayerPair(int(entry[0]), int(entry[1]), float(entry[2]) if len(entry) == 3 else 1.0))
    for p in pairs:
        if not (0 <= p.student < n_student and 0 <= p.teacher < n_teacher):
            raise SettingError("layer_map", f"pair student {p.student} <- teacher {p.teacher} is out of range "
                                            f"(student has {n_student} layers, teacher {n_teacher})")
    if len({p.student for p in pairs}) != len(pairs):
        raise SettingError("layer_map", "a student layer is mapped twice")
    return pairs


class LayerProjector(nn.Module):
    """One Linear(student_width -> teacher_width) per mapped student layer, or identity."""

    def __init__(self, pairs: Sequence[LayerPair], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.needed = student_width != teacher_width
        self.proj = nn.ModuleDict({str(p.student): nn.Linear(student_width, teacher_width, bias=False)
                                   for p in pairs} if self.needed else {})

    def forward(self, student_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj[str(student_layer)](hidden) if self.needed else hidden


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from train.modules import causal_lm

    return causal_lm(model).model.layers


@contextlib.contextmanager
def capture_layers(model: nn.Module, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states of decoder layers `indices` during forwards in the block."""
    store: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)
    handles = []
    for i in set(indices):
        def hook(_module, _inputs, output, i=i):
            store[i] = output[0] if isinstance(output, (tuple, list)) else output
        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token distance [n]: mean squared error over features, or 1 - cosine similarity."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-6)
    raise SettingError("layer_loss", f"{kind!r}: expected one of {LAYER_LOSSES}", sep="=")


def layer_loss(s_states: dict[int, torch.Tensor], t_states: dict[int, torch.Tensor], pairs: Sequence[LayerPair],
               projector: LayerProjector | None, kind: str, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, float]:
    """Weighted mean over pairs of the token-mean distance. `mask` [batch, seq] marks real tokens."""
    total = None
    weight_sum = sum(p.weight for p in pairs)
    for p in pairs:
        s = s_states[p.student]
        s = projector(p.student, s) if projector is not None else s
        d = hidden_distance(s, t_states[p.teacher].detach(), kind)
        d = d[mask].mean() if mask is not None else d.mean()
        total = d * p.weight if total is None else total + d * p.weight
    total = total / weight_sum
    return total, float(total.detach())
