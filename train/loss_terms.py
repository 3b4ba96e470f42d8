"""The terms of a distillation loss and their per-chunk sums, shared by both loss paths: the
checkpointed chunks (train/chunked_loss.py) and the fused head (train/fused_head_loss.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerm:
    name: str
    weight: float
    fn: object  # a registered loss; see train.losses

    @property
    def uses_teacher(self) -> bool:
        return bool(getattr(self.fn, "uses_teacher", True))


def term_sums(s_logits, t_logits, labels, mask, terms, top_k):
    """Every term's SUM over the chunk's tokens, stacked [n_terms], from fp32 logits.

    Shared by the checkpoint path (train/chunked_loss.py) and the fused path
    (train/fused_head_loss.py), so both give every term the same meaning. `mask` None means every row counts."""
    s_kd, t_kd = s_logits, t_logits
    if top_k and t_logits is not None and top_k < t_logits.shape[-1]:
        t_kd, idx = t_logits.topk(top_k, dim=-1)
        s_kd = s_logits.gather(-1, idx)
    parts = []
    for term in terms:
        if term.uses_teacher:
            parts.append(term.fn(s_kd, t_kd, labels, mask) if t_kd is not None else s_logits.sum() * 0.0)
        else:
            parts.append(term.fn(s_logits, t_logits, labels, mask))
    return torch.stack(parts)
