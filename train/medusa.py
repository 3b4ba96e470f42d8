"""Training Medusa heads (common/medusa.py) on a frozen teacher, and measuring what a verify would accept.

One no-grad teacher forward per batch gives f [B, T, H], the final norm's output (the LM head's input).
Head i at position t reads f_t and is trained towards the teacher's distribution at position t + 1 + i
(its prediction of token t + 2 + i): the head's output goes through the teacher's own frozen LM head, the
target through the same head at f_{t+1+i}, and the terms are distillation's (train/losses; TVD by
default, whose minimum maximises acceptance under rejection sampling, as conf/distill/drafter.yaml
argues; forward KL or CE on the sampled token t + 2 + i work the same way). Head i's rows are the
positions t <= T - 3 - i: as the LM loss drops the last position (train/loop.batch_loss's [:, :-1]),
a row counts only where the token it predicts, t + 2 + i, is in the block, so no row reads past it.

The LM head over SmolLM2's 49k vocabulary x k heads x all tokens is never materialised: each head's
rows go through train/chunked_loss.chunked_distill_terms (the fused head + loss on the training path,
chunk by chunk; the teacher's side through the same chunks). The heads share no trained parameter (the
LM head is frozen), so a per-head weight in the total would only rescale each head's gradient, which
Adam undoes: the total is the plain mean over heads.

On CUDA the step runs under bf16 autocast with the loop's speed knobs: the teacher's Linear weights cast
once (train/frozen_casts.py), its decoder layers compiled (train/compiled_layers.py, compile_model),
the fused and optionally compiled loss (fused_head_loss, compile_loss). The heads are a few MB and train
in minutes, so there are no checkpoints and no data-parallel path: one process, one device.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from common.medusa import MedusaHeads
from train.batches import PackedBlocks
from train.chunked_loss import chunked_distill_terms
from train.compiled_layers import LayerCompiler, use_compile_model
from train.config import TrainConfig, check_head_config
from train.frozen_casts import FrozenCasts
from train.loop import batch_indices, forward_hidden, host_values, make_terms
from train.loss_terms import LossTerm
from train.modules import causal_lm


def head_rows(features: torch.Tensor, head_out: torch.Tensor, input_ids: torch.Tensor, i: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head i's hidden states at t, the teacher's at t + 1 + i, token t + 2 + i) for t = 0 .. T - 3 - i,
    each [B, T - 2 - i, ...]: the alignment of the loss, in one place."""
    n = input_ids.shape[1] - 2 - i
    return head_out[:, :n], features[:, 1 + i: 1 + i + n], input_ids[:, 2 + i: 2 + i + n]


def teacher_features(teacher: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """f [B, T, H]: the frozen teacher's final norm output, without a graph."""
    with torch.no_grad():
        return forward_hidden(teacher, input_ids)


def heads_loss(heads: MedusaHeads, features: torch.Tensor, input_ids: torch.Tensor, lm_head: torch.nn.Module,
               terms: list[LossTerm], chunk_size: int, top_k: int | None = None, fused: bool = True,
               compile_loss: bool | str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean over heads of each head's weighted terms, {head{i}_{term}: mean} as 0-d tensors)."""
    out = heads(features)
    total, parts = None, {}
    for i in range(heads.num_heads):
        s, t, labels = head_rows(features, out[i], input_ids, i)
        loss, means = chunked_distill_terms(s, lm_head, t, lm_head, labels, terms, chunk_size, top_k, fused,
                                            compile_loss, n_tokens=labels.numel())
        total = loss if total is None else total + loss
        parts.update({f"head{i}_{term.name}": m for term, m in zip(terms, means)})
    return total / heads.num_heads, parts


def chunked_argmax(hidden: torch.Tensor, head: torch.nn.Module, chunk_size: int) -> torch.Tensor:
    """argmax of head(hidden) over the vocabulary, [...] from [..., H], one chunk of rows at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.cat([head(flat[s: s + chunk_size]).argmax(-1) for s in range(0, flat.shape[0], chunk_size)])
    return out.reshape(hidden.shape[:-1])


def head_matches(heads: MedusaHeads, features: torch.Tensor, lm_head: torch.nn.Module,
                 chunk_size: int) -> torch.Tensor:
    """bool [num_heads, B, T - 1 - num_heads]: whether head i's argmax at t equals the teacher's argmax at
    t + 1 + i (its greedy token t + 2 + i), on the positions where every head has its target."""
    k, n = heads.num_heads, features.shape[1] - 1 - heads.num_heads
    teacher_top = chunked_argmax(features[:, 1: features.shape[1] - 1], lm_head, chunk_size)  # positions 1 .. T-2
    out = heads(features[:, :n])
    return torch.stack([chunked_argmax(out[i], lm_head, chunk_size) == teacher_top[:, i: i + n] for i in range(k)])


def chain_lengths(matches: torch.Tensor) -> torch.Tensor:
    """[num_heads, ...] matches -> [num_heads, ...]: at k = 1 .. num_heads (row k - 1), the drafts a greedy
    verify of heads 0 .. k - 1 accepts (the leading run of matches, capped at k)."""
    return matches.long().cumprod(0).cumsum(0)


@torch.no_grad()
def validate_heads(heads: MedusaHeads, teacher: torch.nn.Module, val: torch.Tensor, terms: list[LossTerm],
                   tc: TrainConfig, device: torch.device) -> dict[str, Any]:
    """On held-out blocks (at most val_batches x batch_size): each head's loss terms, its top-1 agreement
    with the teacher's argmax at its position, and the greedy chain a verify would see: the mean accepted
    length at k = 1 .. num_heads (the target's own token plus the leading heads that agree).

    On sampled text the teacher's argmax at t + 1 + i is conditioned on the sampled tokens between, not
    on the greedy ones a real verify has; on greedy text the two are the same."""
    heads.eval()
    lm_head = causal_lm(teacher).lm_head
    data = PackedBlocks(val)
    n_batches = min(tc.val_batches, math.ceil(len(data) / tc.batch_size))
    loss_sums: dict[str, float] = {}
    agree = torch.zeros(heads.num_heads, dtype=torch.float64)
    accepted = torch.zeros(heads.num_heads, dtype=torch.float64)
    positions = 0
    for b in range(n_batches):
        ids = data.collate(torch.arange(b * tc.batch_size, min((b + 1) * tc.batch_size, len(data)))).input_ids
        ids = ids.to(device)
        features = teacher_features(teacher, ids)
        _, parts = heads_loss(heads, features, ids, lm_head, terms, tc.chunk_size, tc.top_k, fused=False)
        for key, value in host_values(parts).items():
            loss_sums[key] = loss_sums.get(key, 0.0) + value / n_batches
        matches = head_matches(heads, features, lm_head, tc.chunk_size).flatten(1)
        agree += matches.sum(1).double().cpu()
        accepted += chain_lengths(matches).sum(1).double().cpu()
        positions += matches.shape[1]
    heads.train()
    per_term = {t.name: sum(loss_sums[f"head{i}_{t.name}"] for i in range(heads.num_heads)) / heads.num_heads
                for t in terms}
    return {"val_loss": sum(t.weight * per_term[t.name] for t in terms),
            **{f"val_{k}": v for k, v in per_term.items()}, **{f"val_{k}": v for k, v in loss_sums.items()},
            "head_agreement": (agree / max(positions, 1)).tolist(),
            "mean_accepted_length": {k + 1: 1.0 + float(accepted[k]) / max(positions, 1)
                                     for k in range(heads.num_heads)},
            "val_positions": positions}


def train_heads(heads: MedusaHeads, teacher: torch.nn.Module, train: torch.Tensor, val: torch.Tensor,
                tc: TrainConfig, device: torch.device, log_path: Path | None = None,
                name: str = "medusa") -> dict[str, Any]:
    """Train `heads` in place on `train` blocks [N, T] against the frozen `teacher` (on `device`);
    returns the metrics: the validation before (``init_*``) and after training, tokens, throughput."""
    from transformers import get_cosine_schedule_with_warmup

    tc.validate()
    check_head_config(tc, heads.num_heads, int(train.shape[1]))
    torch.manual_seed(tc.seed)
    teacher.requires_grad_(False).eval()
    heads.to(device).train()
    terms = make_terms(tc)
    lm_head = causal_lm(teacher).lm_head
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    casts = FrozenCasts(teacher, torch.bfloat16 if cuda else None)
    compiler = LayerCompiler([teacher], use_compile_model(tc.compile_model, device, False, False))
    params = list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                                  fused=cuda or None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    with compiler.active():
        before = validate_heads(heads, teacher, val, terms, tc, device)
    print(f"{name}: untrained heads: agreement {_fmt(before['head_agreement'])}, mean accepted length "
          f"{_fmt(before['mean_accepted_length'].values())}", flush=True)
    data = PackedBlocks(train)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    t_start, first_s, tokens, logs = time.time(), 0.0, 0, {}
    for step in range(tc.max_steps):
        parts_sum: dict[str, Any] = {}
        for micro in range(tc.grad_accum):
            idx = batch_indices(step * tc.grad_accum + micro, len(data), tc.batch_size, tc.seed)
            ids = data.collate(idx).to(device).input_ids
            with autocast, compiler.active(), casts.active():
                features = teacher_features(teacher, ids)
                loss, parts = heads_loss(heads, features, ids, lm_head, terms, tc.chunk_size, tc.top_k,
                                         tc.fused_head_loss, tc.compile_loss)
            (loss / tc.grad_accum).backward()
            tokens += ids.numel()
            for k, v in {"loss": loss.detach(), **parts}.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / tc.grad_accum
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step == 0:
            first_s = time.time() - t_start  # compile and warm-up, left out of the steady rate
        logs = {"step": step + 1, **host_values(parts_sum), "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / max(time.time() - t_start, 1e-9)}
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.max_steps:
            with compiler.active():
                mid = validate_heads(heads, teacher, val, terms, tc, device)
            print(f"{name} step {step + 1}: val_loss {mid['val_loss']:.4f}, agreement {_fmt(mid['head_agreement'])}",
                  flush=True)
    elapsed = time.time() - t_start
    steady = tokens * (tc.max_steps - 1) / tc.max_steps / (elapsed - first_s) if tc.max_steps > 1 else None
    with compiler.active():
        after = validate_heads(heads, teacher, val, terms, tc, device)
    print(f"{name}: trained heads: agreement {_fmt(after['head_agreement'])}, mean accepted length "
          f"{_fmt(after['mean_accepted_length'].values())}", flush=True)
    return {"steps": tc.max_steps, "train_tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "first_step_s": first_s, "steady_tokens_per_s": steady, "final_loss": logs.get("loss"), **after,
            **{f"init_{k}": v for k, v in before.items() if k in ("val_loss", "head_agreement",
                                                                   "mean_accepted_length")}}


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
