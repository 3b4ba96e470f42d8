"""Mask-preserving distillation fine-tune of a pruned model, through train/loop.py's train_distill.

Pruned weights stay exactly zero in two ways: their gradients are masked by a tensor hook (so
AdamW's moments for them stay zero and its update is zero; decoupled weight decay keeps 0 at 0),
and after every optimizer step the masks are re-applied in place (`on_step`), which also guards
against anything else touching the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from shrink.compress.fake_quant import fake_quantizer
from train.loop import TrainConfig, train_distill


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, keep in masks.items():
            w = model.get_submodule(name).weight
            w.mul_(keep.to(w.device, w.dtype))


def mask_preserving_finetune(student: nn.Module, teacher: nn.Module, masks: dict[str, torch.Tensor],
                             train: torch.Tensor, val: torch.Tensor, tc: TrainConfig, ckpt_dir: Path,
                             log: Callable[[str], None] = print,
                             save_dtype: torch.dtype | str = torch.bfloat16) -> dict[str, Any]:
    """`save_dtype`: the artifact's, for a QAT run's record (`tc.qat`; zeros are on every grid)."""
    handles = []
    for name, keep in masks.items():
        w = student.get_submodule(name).weight
        handles.append(w.register_hook(lambda g, k=keep: g * k.to(g.device, g.dtype)))
    every = max(1, tc.max_steps // 10)

    def on_step(step: int, logs: dict) -> None:
        apply_masks(getattr(student, "module", student), masks)
        if step % every == 0 or step == tc.max_steps:
            log(f"  finetune step {step}/{tc.max_steps} loss {logs.get('loss', float('nan')):.4f}")

    try:
        result = train_distill(student, teacher, train, val, tc, Path(ckpt_dir), on_step=on_step,
                               name="prune.finetune", fake_quant=fake_quantizer(tc.qat, save_dtype))
    finally:
        for h in handles:
            h.remove()
    model = result["model"]
    apply_masks(model, masks)
    return {"model": model, "metrics": result["metrics"]}
