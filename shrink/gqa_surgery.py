"""Grouped-query attention surgery: pool K/V heads into fewer groups, or expand them back to MHA.

transformers' Llama-family attention (Llama, Mistral, Qwen2/3, Gemma, ...) gives query head h the
key/value head h // (num_heads // num_kv_heads) (`repeat_kv`). With G groups, new KV head g serves
query heads [g * H/G, (g + 1) * H/G). Pooling is therefore defined on the per-query-head view:
expand the current KV heads to one per query head (exact), then combine the H/G copies that serve
group g. When G divides the current KV count this is the plain mean of the KV heads of the group
(Ainslie et al. 2023); otherwise each old head weighs by the number of the group's query heads it
served, which is the only pooling consistent with the mapping.

`k_norm`/`q_norm` (Qwen3, Gemma3) normalise over head_dim with weights shared by all heads, so they
carry over unchanged. K/V projection biases (Qwen2) are pooled like the weight rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from common.errors import ShrinkError

POOL_INITS = ("mean", "first", "random")


@dataclass(frozen=True)
class KVLayout:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> "KVLayout":
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(int(config.num_hidden_layers), heads, int(kv if kv is not None else heads), int(head_dim))

    def bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V of one token in every layer: 2 * layers * kv_heads * head_dim * bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_element

    def cache_bytes(self, batch: int, context: int, bytes_per_element: int = 2) -> int:
        return self.bytes_per_token(bytes_per_element) * batch * context


def kv_report(config: Any, batch: int, context: int, bytes_per_element: int) -> dict[str, int]:
    layout = KVLayout.of(config)
    return {"kv_heads": layout.kv_heads, "kv_bytes_per_token": layout.bytes_per_token(bytes_per_element),
            "kv_cache_bytes": layout.cache_bytes(batch, context, bytes_per_element)}


def check_pool_target(config: Any, groups: int, key: str = "gqa.kv_heads") -> None:
    """Raise a ShrinkError unless pooling to `groups` KV heads is well defined (before any work)."""
    layout = KVLayout.of(config)
    if groups < 1:
        raise ShrinkError(f"{key}={groups}: need at least 1 key/value head")
    if layout.heads % groups:
        raise ShrinkError(f"{key}={groups} does not divide the model's {layout.heads} query heads "
                          f"(num_attention_heads); choose a divisor of {layout.heads}")
    if groups >= layout.kv_heads:
        raise ShrinkError(f"{key}={groups} must be fewer than the model's {layout.kv_heads} key/value heads "
                          f"(num_key_value_heads) to pool; use gqa.mode=expand to add heads")


def check_expand_target(config: Any, kv_heads: int, key: str = "gqa.kv_heads") -> None:
    """Expansion is exact only when every new KV head serves query heads of a single old KV head."""
    layout = KVLayout.of(config)
    if kv_heads <= layout.kv_heads or layout.heads % kv_heads or kv_heads % layout.kv_heads:
        raise ShrinkError(f"{key}={kv_heads}: expansion needs a multiple of the current {layout.kv_heads} "
                          f"key/value heads that divides the {layout.heads} query heads (e.g. {layout.heads})")


def attention_modules(model: nn.Module) -> Iterator[nn.Module]:
    found = False
    for module in model.modules():
        if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "num_key_value_groups")):
            found = True
            yield module
    if not found:
        raise ShrinkError(f"{type(model).__name__}: no Llama-family attention (q_proj/k_proj/v_proj) found")


def _per_query_head(t: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """[kv_heads * d, ...] -> [heads, d, ...]: the K/V rows each query head uses (repeat_kv order)."""
    per_kv = t.reshape(kv_heads, -1, *t.shape[1:])
    return per_kv.repeat_interleave(heads // kv_heads, dim=0)


def pool_rows(t: torch.Tensor, kv_heads: int, heads: int, groups: int, init: str,
              generator: torch.Generator | None = None, std: float | None = None) -> torch.Tensor:
    """Combine the K/V rows (weight [kv*d, in] or bias [kv*d]) into `groups` heads."""
    per_q = _per_query_head(t, kv_heads, heads)  # [H, d, ...]
    grouped = per_q.reshape(groups, heads // groups, *per_q.shape[1:])  # [G, H/G, d, ...]
    if init == "mean":
        # float64 keeps a mean of identical copies exact, so expand-then-pool is an identity.
        out = grouped.double().mean(dim=1).to(t.dtype)
    elif init == "first":
        out = grouped[:, 0].clone()
    elif init == "random":
        out = torch.randn(grouped[:, 0].shape, generator=generator, dtype=torch.float32)
        out = (out * (std if std is not None else float(t.float().std()))).to(t.device, t.dtype)
    else:
        raise ShrinkError(f"gqa.init={init!r}: expected one of {', '.join(POOL_INITS)}")
    return out.reshape(groups * out.shape[1], *t.shape[1:]).contiguous()


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(old.in_features, weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(old.weight.requires_grad)
    return layer


def _rewrite_kv(model: nn.Module, new_kv: int, rows) -> nn.Module:
    """Replace every k_proj/v_proj by `rows(tensor, kind)` and point config and modules at `new_kv`."""
    layout = KVLayout.of(model.config)
    for attn in attention_modules(model):
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            weight = rows(old.weight.detach(), "weight")
            bias = rows(old.bias.detach(), "bias") if old.bias is not None else None
            setattr(attn, name, _new_linear(old, weight, bias))
        attn.num_key_value_groups = layout.heads // new_kv
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = new_kv
    model.config.num_key_value_heads = new_kv
    return model


def pool_kv_heads(model: nn.Module, groups: int, init: str = "mean", seed: int = 0) -> nn.Module:
    """Convert `model` in place to `groups` KV heads; `init` is mean | first | random."""
    check_pool_target(model.config, groups)
    if init not in POOL_INITS:
        raise ShrinkError(f"gqa.init={init!r}: expected one of {', '.join(POOL_INITS)}")
    layout = KVLayout.of(model.config)
    generator = torch.Generator().manual_seed(seed)

    def rows(t: torch.Tensor, kind: str) -> torch.Tensor:
        if init == "random" and kind == "bias":
            return torch.zeros(groups * layout.head_dim, dtype=t.dtype, device=t.device)
        return pool_rows(t, layout.kv_heads, layout.heads, groups, init, generator)

    return _rewrite_kv(model, groups, rows)


def expand_kv_heads(model: nn.Module, kv_heads: int | None = None) -> nn.Module:
    """Repeat KV heads in place (default: one per query head, i.e. MHA). Exact: same logits."""
    layout = KVLayout.of(model.config)
    target = int(kv_heads or layout.heads)
    check_expand_target(model.config, target)

    def rows(t: torch.Tensor, kind: str) -> torch.Tensor:
        per_kv = t.reshape(layout.kv_heads, -1, *t.shape[1:])
        return per_kv.repeat_interleave(target // layout.kv_heads, dim=0).reshape(-1, *t.shape[1:]).contiguous()

    return _rewrite_kv(model, target, rows)


def convert(model: nn.Module, mode: str, kv_heads: int | None, init: str = "mean", seed: int = 0) -> nn.Module:
    """The stage's conversion: `mode=pool` (to `kv_heads`, by `init`) or `mode=expand`."""
    if mode == "pool":
        if kv_heads is None:
            raise ShrinkError("gqa.kv_heads must be set for gqa.mode=pool")
        return pool_kv_heads(model, int(kv_heads), init, seed)
    if mode == "expand":
        return expand_kv_heads(model, kv_heads)
    if mode == "keep":  # a measured no-op: for a model whose pooled KV heads cost more than they buy
        return model
    raise ShrinkError(f"gqa.mode={mode!r}: expected pool, expand or keep")


def check_target(config: Any, mode: str, kv_heads: int | None, init: str = "mean") -> None:
    """Every check `convert` makes, on a config alone (no weights loaded)."""
    if mode == "pool":
        if kv_heads is None:
            raise ShrinkError("gqa.kv_heads must be set for gqa.mode=pool")
        check_pool_target(config, int(kv_heads))
        if init not in POOL_INITS:
            raise ShrinkError(f"gqa.init={init!r}: expected one of {', '.join(POOL_INITS)}")
    elif mode == "expand":
        check_expand_target(config, int(kv_heads or KVLayout.of(config).heads))
    elif mode == "keep":
        pass
    else:
        raise ShrinkError(f"gqa.mode={mode!r}: expected pool, expand or keep")
