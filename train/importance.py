"""Measured importance of decoder layers and MLP/hidden channels, on calibration token blocks.

- Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean cos(x_in, x_out) over tokens of
  layer i. A layer that barely turns its input is cheap to drop.
- Drop-one loss (Minitron-style depth importance, Muralidharan et al. 2024): the increase in LM
  loss on the calibration data when layer i alone is skipped.
- Channel activation importance (Minitron width): mean |activation| of each MLP intermediate
  channel (input of down_proj), of each hidden (embedding) channel (output of every layer norm,
  Minitron's LayerNorm-activation score), and the mean L2 norm of each attention head's output
  (its slice of the input of o_proj).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ShrinkError
from train.modules import causal_lm

METRICS = ("bi", "drop_loss")


def _batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i : i + batch_size]


@torch.no_grad()
def block_influence(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    lm = causal_lm(model)
    layers = lm.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    handles = []
    for i, layer in enumerate(layers):
        def hook(_m, args, kwargs, output, i=i):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            sums[i] += (1.0 - cos).sum().item()
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    device = next(lm.parameters()).device
    try:
        for chunk in _batches(ids, batch_size):
            lm.model(input_ids=chunk.to(device))
            count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


@contextlib.contextmanager
def _skipping(lm: nn.Module, index: int) -> Iterator[None]:
    layers = lm.model.layers
    kept = nn.ModuleList([layer for j, layer in enumerate(layers) if j != index])
    lm.model.layers = kept
    try:
        yield
    finally:
        lm.model.layers = layers


@torch.no_grad()
def lm_loss(lm: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    device = next(lm.parameters()).device
    total, n = 0.0, 0
    for chunk in _batches(ids, batch_size):
        chunk = chunk.to(device)
        logits = lm(input_ids=chunk).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        n += chunk[:, 1:].numel()
    return total / n


@torch.no_grad()
def drop_one_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Loss increase when each layer alone is skipped (the layer's own KV-cache index is unused:
    no cache during these forwards)."""
    lm = causal_lm(model)
    base = lm_loss(lm, ids, batch_size)
    out = []
    for i in range(len(lm.model.layers)):
        with _skipping(lm, i):
            out.append(lm_loss(lm, ids, batch_size) - base)
    return out


def layer_importance(model: nn.Module, ids: torch.Tensor, metric: str = "bi", batch_size: int = 8) -> list[float]:
    if metric == "bi":
        return block_influence(model, ids, batch_size)
    if metric == "drop_loss":
        return drop_one_loss(model, ids, batch_size)
    raise ShrinkError(f"student.importance={metric!r}: expected one of {METRICS}")


def top_layers(scores: list[float], n: int, always_keep: tuple[int, ...] = ()) -> list[int]:
    """The n most important layers (ties broken by position), always including `always_keep`."""
    if not 1 <= n <= len(scores):
        raise ShrinkError(f"cannot keep {n} of {len(scores)} layers")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = [i for i in always_keep if 0 <= i < len(scores)][:n]
    for i in order:
        if len(chosen) == n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


@torch.no_grad()
def channel_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{"hidden": [hidden], "mlp.<i>": [intermediate], "heads.<i>": [attention heads]} summed over
    calibration tokens: |activation| per channel, the L2 norm of each head's output per head."""
    lm = causal_lm(model)
    hidden = torch.zeros(lm.config.hidden_size, dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def add(key: str, value: torch.Tensor) -> None:
        value = value.double().cpu()
        sums[key] = sums[key] + value if key in sums else value

    def norm_hook(_m, _i, out):
        hidden.add_(out.detach().float().abs().reshape(-1, out.shape[-1]).sum(0).double().cpu())

    for i, layer in enumerate(lm.model.layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(norm_hook))
        hd = layer.self_attn.head_dim

        def down_hook(_m, args, i=i):
            add(f"mlp.{i}", args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0))

        def o_hook(_m, args, i=i, hd=hd):
            per_head = args[0].detach().float().reshape(-1, args[0].shape[-1] // hd, hd)
            add(f"heads.{i}", per_head.norm(dim=-1).sum(0))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook))
    device = next(lm.parameters()).device
    try:
        for chunk in _batches(ids, batch_size):
            lm.model(input_ids=chunk.to(device))
    finally:
        for h in handles:
            h.remove()
    return {"hidden": hidden, **sums}
