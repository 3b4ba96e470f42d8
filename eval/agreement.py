"""Agreement with the teacher on a fixed set of held-out token windows: how often the artifact's
top-1 next token is the teacher's, and the mean KL(teacher || artifact) per scored token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ShrinkError


def fixed_windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over the text (the same on every call)."""
    ids = ids.view(-1)
    if ids.numel() < length:
        raise ShrinkError(f"eval.agreement.window_len={length}: the held-out text has only {ids.numel()} tokens")
    last = ids.numel() - length
    starts = [round(i * last / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    return torch.stack([ids[s : s + length] for s in starts])


@dataclass
class Reference:
    """The teacher's next-token log-probabilities on the windows (kept on the CPU in fp32)."""

    windows: torch.Tensor  # [count, length]
    logprobs: torch.Tensor  # [count, length, vocab]


@torch.no_grad()
def _logprobs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.stack([F.log_softmax(model(w.to(device).unsqueeze(0)).logits[0].float(), dim=-1).cpu()
                        for w in windows])


def teacher_reference(teacher: torch.nn.Module, windows: torch.Tensor) -> Reference:
    return Reference(windows, _logprobs(teacher, windows))


def agreement(model: torch.nn.Module, reference: Reference) -> dict[str, float | int]:
    """top1_agreement in [0, 1] and kl_to_teacher (nats per token) over every window position
    (KL is clamped at 0: rounding can make a model's KL to itself a hair negative)."""
    logprobs = _logprobs(model, reference.windows)
    if logprobs.shape[-1] != reference.logprobs.shape[-1]:
        raise ShrinkError(f"agreement: vocabulary of {logprobs.shape[-1]} tokens, the teacher's has "
                          f"{reference.logprobs.shape[-1]}")
    teacher = reference.logprobs
    top1 = (logprobs.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    kl = (teacher.exp() * (teacher - logprobs)).sum(-1).mean().item()
    return {"top1_agreement": top1, "kl_to_teacher": max(kl, 0.0)}
