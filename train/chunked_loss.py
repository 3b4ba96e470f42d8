"""The distillation loss over a batch, computed chunk by chunk.

The student's and teacher's logits over the whole batch ([tokens x vocab] in fp32 is 3.2 GB at
16k tokens and vocab 49k, twice) never exist at once: for each chunk of tokens we project the
final hidden states through each model's LM head, compute every loss term, and checkpoint the
chunk so its logits are recomputed in backward instead of kept. Peak extra memory is therefore
about one chunk's logits (a few x chunk_size x vocab x 4 bytes), whatever the batch.

Top-k: with `top_k`, the teacher's distribution is truncated to its k most likely tokens and the
student's is renormalised over the same k tokens (so reverse KL and JSD stay finite); only the
teacher-based terms see the truncation, CE always uses the full student distribution.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from train.batches import to_device
from train.fused_head_loss import can_fuse, fused_head_loss
from train.loss_terms import LossTerm, term_sums


def _chunk_loss(s_hidden, t_hidden, labels, mask, s_head, t_head, terms, top_k):
    s_logits = s_head(s_hidden).float()
    t_logits = None
    if t_hidden is not None:
        with torch.no_grad():
            t_logits = t_head(t_hidden).float()
    return term_sums(s_logits, t_logits, labels, mask, terms, top_k)


def chunked_distill_loss(student_hidden: torch.Tensor, student_head: torch.nn.Module,
                         teacher_hidden: torch.Tensor | None, teacher_head: torch.nn.Module | None,
                         labels: torch.Tensor, terms: list[LossTerm], chunk_size: int = 1024,
                         top_k: int | None = None, fused: bool = True,
                         compile_loss: bool | str = "auto") -> tuple[torch.Tensor, dict[str, float]]:
    """(weighted total, {term: mean value}): chunked_distill_terms with the means read back to the host."""
    total, means = chunked_distill_terms(student_hidden, student_head, teacher_hidden, teacher_head, labels, terms,
                                         chunk_size, top_k, fused, compile_loss)
    return total, dict(zip((t.name for t in terms), means.tolist()))


def chunked_distill_terms(student_hidden: torch.Tensor, student_head: torch.nn.Module,
                          teacher_hidden: torch.Tensor | None, teacher_head: torch.nn.Module | None,
                          labels: torch.Tensor, terms: list[LossTerm], chunk_size: int = 1024,
                          top_k: int | None = None, fused: bool = True, compile_loss: bool | str = "auto",
                          n_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over tokens of every term. `labels` uses -100 for tokens that do not count.

    Hidden states are [batch, seq, hidden] already aligned with `labels` [batch, seq] (the caller
    shifts). Returns (total loss, {term: mean value}). With `fused` (and a plain bias-free Linear
    student head, grad enabled) the fused head+loss path of train/fused_head_loss.py computes the
    same values without recomputing chunks in backward; `compile_loss` (auto | true | false) lets
    it torch.compile the per-chunk terms. Otherwise each chunk is checkpointed as described above.
    """
    s_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    labels = labels.reshape(-1)
    mask = labels != -100
    if n_tokens is None:
        n_tokens = int(mask.sum())
    if n_tokens == 0:
        zero = s_flat.sum() * 0.0
        return zero, torch.zeros(len(terms), device=s_flat.device)
    safe_labels = labels.clamp_min(0)
    # Only the rows that count go through the heads: padding and prompts cost nothing.
    if n_tokens < mask.numel():
        rows = mask.nonzero().squeeze(1)
        s_flat, safe_labels = s_flat[rows], safe_labels[rows]
        t_flat = t_flat[rows] if t_flat is not None else None
        mask = torch.ones_like(safe_labels, dtype=torch.bool)
    weights = term_weights(terms, s_flat.device)
    if fused:
        if can_fuse(student_head, s_flat):
            total, sums = fused_head_loss(s_flat, student_head, t_flat, teacher_head, safe_labels, terms, weights,
                                          chunk_size, top_k, n_tokens, compile_loss)
            return total, sums / n_tokens
    sums = None
    for start in range(0, s_flat.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (s_flat[sl], t_flat[sl] if t_flat is not None else None, safe_labels[sl], mask[sl])
        if torch.is_grad_enabled() and s_flat.requires_grad:
            part = checkpoint(_chunk_loss, *args, student_head, teacher_head, terms, top_k, use_reentrant=False)
        else:
            part = _chunk_loss(*args, student_head, teacher_head, terms, top_k)
        sums = part if sums is None else sums + part
    means = sums / n_tokens
    total = (means * weights).sum()
    return total, means.detach()


def term_weights(terms: list[LossTerm], device: torch.device) -> torch.Tensor:
    """The terms' fp32 weights on `device`; to a GPU without a blocking copy (which would wait for the
    forward passes queued before the loss)."""
    return to_device(torch.tensor([t.weight for t in terms], dtype=torch.float32), device)
