"""The distillation training loop, on accelerate.

The batch of step s is a pure function of (seed, s): blocks are visited in a seeded permutation
per epoch. With the model, optimizer, scheduler and RNG restored from a checkpoint, a resumed run
therefore sees exactly the batches and updates an uninterrupted run would.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from shrink.errors import ShrinkError
from train.checkpoint import checkpoint_step, load_checkpoint, remove_checkpoint, save_checkpoint
from train.chunked_loss import LossTerm, chunked_distill_loss
from train.losses import make_loss

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    chunk_size: int = 1024
    losses: dict[str, float] = field(default_factory=lambda: {"forward_kl": 1.0, "ce": 0.5})
    temperature: float = 2.0
    checkpoint_every: int = 100
    eval_every: int = 0
    val_batches: int = 8
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: Any, seed: int, block_size: int) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in dict(cfg).items() if k in known}
        tc = cls(**values, seed=seed)
        if cfg.get("tokens"):
            tc.max_steps = max(1, math.ceil(int(cfg.tokens) / (tc.batch_size * tc.grad_accum * block_size)))
        tc.validate()
        return tc

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ShrinkError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ShrinkError(f"distill.lr must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ShrinkError(f"distill.temperature must be > 0, got {self.temperature}")
        if not self.losses:
            raise ShrinkError("distill.losses is empty: name at least one loss with a weight")


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """The block indices of global micro-batch `step`: positions in a seeded permutation per epoch."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_blocks)
        out.append(_epoch_permutation(seed, epoch, n_blocks)[offset])
    return torch.stack(out)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n_blocks: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm), before the LM head."""
    return _base(model).model(input_ids=input_ids).last_hidden_state


def distill_batch_loss(student, teacher, input_ids, terms, chunk_size):
    labels = input_ids[:, 1:]
    s_hidden = forward_hidden(student, input_ids)[:, :-1]
    t_hidden = None
    if teacher is not None:
        with torch.no_grad():
            t_hidden = forward_hidden(teacher, input_ids)[:, :-1]
    t_head = _base(teacher).lm_head if teacher is not None else None
    return chunked_distill_loss(s_hidden, _base(student).lm_head, t_hidden, t_head, labels, terms, chunk_size)


def make_terms(tc: TrainConfig) -> list[LossTerm]:
    return [LossTerm(name, float(w), make_loss(name, temperature=tc.temperature)) for name, w in tc.losses.items()
            if float(w) != 0.0]


@torch.no_grad()
def validation_loss(student, teacher, val: torch.Tensor, terms, tc: TrainConfig, device) -> dict[str, float]:
    student.eval()
    totals: dict[str, float] = {}
    n = min(tc.val_batches, math.ceil(val.shape[0] / tc.batch_size))
    for i in range(n):
        ids = val[i * tc.batch_size : (i + 1) * tc.batch_size].to(device)
        _, parts = distill_batch_loss(student, teacher, ids, terms, tc.chunk_size)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v / n
    student.train()
    return {f"val_{k}": v for k, v in totals.items()}


def train_distill(student: torch.nn.Module, teacher: torch.nn.Module | None, train: torch.Tensor,
                  val: torch.Tensor, tc: TrainConfig, ckpt_dir: Path, resume: bool = False,
                  tracker: Any = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `student` in place. Returns final metrics. `on_step(step, logs)` runs after each step."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    ckpt_dir = Path(ckpt_dir)
    use_bf16 = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no",
                              gradient_accumulation_steps=tc.grad_accum)
    set_seed(tc.seed)
    terms = make_terms(tc)
    needs_teacher = any(getattr(t.fn, "uses_teacher", True) for t in terms)
    if needs_teacher and teacher is None:
        raise ShrinkError("a teacher-based loss is configured but no teacher was given")
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)

    start_step = 0
    if resume and checkpoint_step(ckpt_dir) is not None:
        start_step = int(load_checkpoint(accelerator, ckpt_dir)["step"])
        accelerator.print(f"distill: resumed from {ckpt_dir} at step {start_step}")
    elif not resume:
        remove_checkpoint(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = ckpt_dir.parent / f"{ckpt_dir.name}.{LOG_FILE}"
    if start_step == 0:
        log_path.unlink(missing_ok=True)

    student.train()
    tokens_per_step = tc.batch_size * tc.grad_accum * train.shape[1]
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="distill", disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    t_start, tokens_done, logs = time.time(), 0, {}
    for step in range(start_step, tc.max_steps):
        parts_sum: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            idx = batch_indices(step * tc.grad_accum + micro, train.shape[0], tc.batch_size, tc.seed)
            ids = train[idx].to(accelerator.device)
            with accelerator.accumulate(student), accelerator.autocast():
                loss, parts = distill_batch_loss(student, teacher, ids, terms, tc.chunk_size)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(student.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / tc.grad_accum
        tokens_done += tokens_per_step
        elapsed = time.time() - t_start
        total = sum(tc.losses[k] * v for k, v in parts_sum.items())
        logs = {"step": step + 1, "loss": total, **parts_sum, "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_done / max(elapsed, 1e-9)}
        with open(log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
        if tracker is not None and (step + 1) % tracker.log_every == 0:
            tracker.log(logs, step=step + 1)
        if tc.eval_every and (step + 1) % tc.eval_every == 0:
            vlogs = validation_loss(student, teacher, val, terms, tc, accelerator.device)
            if tracker is not None:
                tracker.log(vlogs, step=step + 1)
        if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.max_steps:
            save_checkpoint(accelerator, ckpt_dir, step + 1)
        if on_step is not None:
            on_step(step + 1, logs)
    bar.close()
    metrics = {"steps": tc.max_steps, "train_tokens": tc.max_steps * tokens_per_step,
               "tokens_per_s": logs.get("tokens_per_s"), "final_loss": logs.get("loss"),
               **validation_loss(student, teacher, val, terms, tc, accelerator.device)}
    if tracker is not None:
        tracker.log(metrics, step=tc.max_steps)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(student)
    return {"metrics": metrics, "model": unwrapped}
