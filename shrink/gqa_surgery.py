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

`svd` is the best linear merge of each group that keeps RoPE exact, the per-head residual folded
into Q and O (so it is exact whenever the group's heads are such maps of one shared head):
- V: query head j adds W_o,j W_v,j x to the residual stream; the group's stacked maps get their best
  rank-d factorization B_j P: the merged value head is P and B_j becomes head j's o_proj columns.
- K: rotary turns each dimension pair (i, i + d/2) (the rotate_half layout) into one complex number;
  a 2x2 map commutes with every rotation only if it is a complex scalar, so per pair the group's
  complex rows get their best rank-1 factorization alpha_j * c (row j weighted by query head j's
  pair norm); the merged pair rows are c and query head j's pair rows are multiplied by
  conj(alpha_j), which keeps Re(conj(q) k), so every score.
- Errors are measured on activations, not weights: each factorization is of W L, with L L^T the
  second moment of the attention input over calibration tokens, measured layer by layer on the
  model as merged so far (so each layer sees the inputs it will get). Unweighted, the factorizations
  were worse than the plain mean on SmolLM2 (the input has a few dimensions far larger than the rest).
- A factorization is fixed only up to a gauge (P -> R P, B -> B R^-1; c -> r c, alpha -> alpha / r),
  which leaves the function alone but not its compressibility: the merged head gets the scale and
  channel correlations of the heads it replaces (`_align`), so int4 and 2:4 treat it like them.
Biases ride along as an extra input column (an input of constant 1), so q's bias turns with its rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from common.errors import ShrinkError

POOL_INITS = ("mean", "first", "random", "svd")
# `auto` (the default): svd where the model takes it, else mean. Measured on the H200 (2026-11-30, SmolLM2
# 3 -> 1, WikiText-2 21.32 before): right after pooling svd 270 vs mean 23,035; after a 10 M-token uptrain
# 36.6 vs 76.8 (BENCHMARKS.md, "Eleventh session").
INITS = (*POOL_INITS, "auto")
# `svd` needs the rotate_half rotary layout on the whole head and no per-head q/k norm (the complex
# scalars folded into q would not pass through a norm): the model types known to have both.
SVD_MODEL_TYPES = ("llama", "mistral", "qwen2")
# svd's second moments; SmolLM2 3 -> 1 right after merging (one pass): 8k tokens ppl 434, 32k 293, 128k 298
SVD_CALIBRATION_TOKENS = 32768


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


def svd_unsupported(config: Any) -> str | None:
    """Why `svd` cannot merge this model's heads, or None where it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SVD_MODEL_TYPES:
        return (f"supported for model types {', '.join(SVD_MODEL_TYPES)} (full rotate_half rotary, no per-head "
                f"q/k norm), not {model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5 keeps the factor here
    partial = float(getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        return f"needs the rotary on the whole head; this {model_type} rotates {partial:g} of it"
    return None


def check_init(config: Any, init: str, key: str = "gqa.init") -> None:
    if init not in INITS:
        raise ShrinkError(f"{key}={init!r}: expected one of {', '.join(INITS)}")
    if init == "svd" and (why := svd_unsupported(config)):
        raise ShrinkError(f"{key}=svd: {why}; use {key}=mean")


def resolve_init(config: Any, init: str, key: str = "gqa.init") -> str:
    """The pool init `init` names for this model: `auto` is svd where the model takes it, else mean."""
    check_init(config, init, key)
    if init != "auto":
        return init
    return "mean" if svd_unsupported(config) else "svd"


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


def _set_kv_heads(model: nn.Module, new_kv: int) -> nn.Module:
    """Point the config and every attention module at `new_kv` KV heads (their k/v_proj rewritten)."""
    heads = KVLayout.of(model.config).heads
    for attn in attention_modules(model):
        attn.num_key_value_groups = heads // new_kv
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = new_kv
    model.config.num_key_value_heads = new_kv
    return model


def _rewrite_kv(model: nn.Module, new_kv: int, rows) -> nn.Module:
    """Replace every k_proj/v_proj by `rows(tensor, kind)` and point config and modules at `new_kv`."""
    for attn in attention_modules(model):
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            weight = rows(old.weight.detach(), "weight")
            bias = rows(old.bias.detach(), "bias") if old.bias is not None else None
            setattr(attn, name, _new_linear(old, weight, bias))
    return _set_kv_heads(model, new_kv)


def _with_bias(layer: nn.Linear) -> torch.Tensor:
    """[out, in (+1)] in float64: the bias, if any, as the column of a constant-1 input."""
    w = layer.weight.detach().double()
    return torch.cat([w, layer.bias.detach().double()[:, None]], 1) if layer.bias is not None else w


def _set_with_bias(layer: nn.Linear, extended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split `_with_bias`'s layout back into (weight, bias) in `layer`'s dtype."""
    dtype = layer.weight.dtype
    if layer.bias is None:
        return extended.to(dtype), None
    return extended[:, :-1].to(dtype), extended[:, -1].to(dtype)


def _factor(stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factorization of n stacked blocks [..., n, rows, m] (real or complex):
    block j ~= left[..., j] @ right, left [..., n, rows, rank], right [..., rank, m]. Where the stack is
    taller than wide (the V heads' output maps: 1,728 x 577 a layer on SmolLM2), `right` is the top
    eigenvectors of its Gram matrix A^H A and left = A right^H (= U S of the thin SVD), 4-5x faster than
    the SVD on the CPU; the two can differ by a unitary within the rank-`rank` subspace, which _align's
    gauge absorbs (float64: the Gram matrix squares condition numbers, far from its precision here)."""
    *batch, n, rows, m = stack.shape
    a = stack.reshape(*batch, n * rows, m)
    if n * rows > m:
        _, vectors = torch.linalg.eigh(a.mH @ a)  # ascending
        right = vectors[..., -rank:].flip(-1).mH
        return (a @ right.mH).reshape(*batch, n, rows, rank), right
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]).reshape(*batch, n, rows, rank), vh[..., :rank, :]


def _align(right: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gauge R (and R^-1) of a factorization (right -> R right, left -> left R^-1), given `right`
    [..., rank, m] (orthonormal rows) and the group's heads [..., n, rows, m] it replaces, in R = S Q:
    Q, the unitary polar factor of the fit of `right` to the mean head, turns the merged head towards
    the heads; S, the root of the heads' mean second moment in that basis, gives its channels the
    scale and correlations of theirs. Identical heads give back that head. R = the least-squares fit
    to the mean head alone is ill-conditioned where the heads cancel in their mean: on SmolLM2 (3 -> 1)
    its condition numbers were 200-1000 and o_proj took its inverse (column norms median 56, max 787;
    4.8 and 14 with R = S Q), so int4 and 2:4 wrecked the merge: perplexity 294 -> 1.2M (RTN g64),
    10,392 (GPTQ g64), 5.5M (SparseGPT 2:4); with R = S Q 554, 410, 533. S's eigenvalues are clamped
    to 1e-6 of the largest (its root to 1e-3) so that R stays invertible when all heads are degenerate."""
    fits = heads @ right.unsqueeze(-3).mH  # [..., n, rows, rank]: each head in the basis of `right`
    u, _, vh = torch.linalg.svd(fits.mean(-3))
    turn = u @ vh
    eigenvalues, vectors = torch.linalg.eigh((fits @ fits.mH).mean(-3))
    root = eigenvalues.clamp_min(0).sqrt()
    root = torch.maximum(root, 1e-3 * root[..., -1:]).to(vectors.dtype)
    scale = vectors * root[..., None, :] @ vectors.mH
    inverse = vectors / root[..., None, :] @ vectors.mH
    return scale @ turn, turn.mH @ inverse


def _complex_pairs(rows: torch.Tensor) -> torch.Tensor:
    """[..., d, m] real rows -> [..., d/2, m] complex: rotary pair (i, i + d/2) as row_i + 1j row_{i+d/2}."""
    half = rows.shape[-2] // 2
    return torch.complex(rows[..., :half, :], rows[..., half:, :])


def _real_pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], -2)


def svd_calibration(train: torch.Tensor) -> torch.Tensor:
    """The first rows of packed training blocks [N, T] that hold SVD_CALIBRATION_TOKENS tokens."""
    return train[:-(-SVD_CALIBRATION_TOKENS // train.shape[1])]


class _Reached(Exception):
    """Raised by the calibration hook to stop a forward once the attention it measures has its input."""


def _extended_moment_sum(inputs: torch.Tensor) -> torch.Tensor:
    """The sum of x x^T over the rows x of `inputs` [..., in] extended by a constant 1, float64."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    return x.T @ x


@torch.no_grad()
def attention_input_moment(model: nn.Module, attn: nn.Module, calibration: torch.Tensor) -> torch.Tensor:
    """E[x x^T] of `attn`'s input x (q_proj's) extended by a constant 1, [in+1, in+1] float64, over the
    token rows `calibration` [B, T]; each forward stops at `attn`."""
    total = 0.0

    def accumulate(module: nn.Module, args: tuple) -> None:
        nonlocal total
        total = total + _extended_moment_sum(args[0])
        raise _Reached

    handle = attn.q_proj.register_forward_pre_hook(accumulate)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        for rows in calibration.split(8):
            with contextlib.suppress(_Reached):
                model(rows.to(device), use_cache=False)
    finally:
        model.train(was_training)
        handle.remove()
    return total / calibration.numel()


@torch.no_grad()
def _svd_merge_layer_by_layer(model: nn.Module, layout: KVLayout, groups: int, calibration: torch.Tensor) -> None:
    """svd-merge every attention in order, each weighed by the inputs the layers already merged give it:
    the same moments as attention_input_moment(model, attn, calibration) taken after each merge, but
    each decoder layer runs once over the calibration rows (its captured inputs, then its output is
    the next layer's input) instead of a forward from the embeddings per layer (quadratic in depth:
    435 layer passes for SmolLM2's 30 layers instead of 30)."""
    attns = list(attention_modules(model))
    parents = {id(child): module for module in model.modules() for child in module.children()}
    layers = [parents[id(attn)] for attn in attns]  # the decoder layer of each attention
    chunks: list[tuple[tuple, dict]] = []
    total: Any = 0.0

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        chunks.append((args, kwargs))
        raise _Reached

    def accumulate(module: nn.Module, args: tuple) -> None:
        nonlocal total
        total = total + _extended_moment_sum(args[0])
        raise _Reached

    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for rows in calibration.split(8):  # (attention_input_moment's chunks: the same sums)
                with contextlib.suppress(_Reached):
                    model(rows.to(device), use_cache=False)
        finally:
            handle.remove()
        for i, (layer, attn) in enumerate(zip(layers, attns)):
            total = 0.0
            handle = attn.q_proj.register_forward_pre_hook(accumulate)
            try:
                for args, kwargs in chunks:
                    with contextlib.suppress(_Reached):
                        layer(*args, **kwargs)
            finally:
                handle.remove()
            _svd_merge_attention(attn, layout, groups, total / calibration.numel())
            attn.num_key_value_groups = layout.heads // groups
            if i + 1 < len(layers):
                chunks = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in chunks]
    finally:
        model.train(was_training)


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (a tensor, or the first of a tuple in older transformers)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _svd_merge_attention(attn: nn.Module, layout: KVLayout, groups: int, moment: torch.Tensor) -> None:
    """Merge one attention's K/V heads into `groups` by `svd` (module docstring), folding into q/o_proj.
    `moment` (E[x x^T] of the attention input, extended by 1) makes every factorization minimise the
    error of the projected activations, not of the weights: factorize W L (C = L L^T), map back by L^-1."""
    n, d = layout.heads // groups, layout.head_dim
    moment = moment.to(attn.q_proj.weight.device)
    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    full_root = torch.linalg.cholesky(moment + 1e-6 * moment.diagonal().mean() * eye)

    def root(layer: nn.Linear) -> torch.Tensor:
        """The input has the constant-1 column only with a bias; without it, the root of the leading
        block of the moment, which is the leading block of the full root (L lower triangular)."""
        return full_root if layer.bias is not None else full_root[:-1, :-1]

    def whitened(layer: nn.Linear) -> torch.Tensor:
        return _with_bias(layer) @ root(layer)

    def unwhiten(right: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        # One solve for every row (a batched right would broadcast, and copy, the root per batch entry)
        rows = right.reshape(-1, right.shape[-1])
        return torch.linalg.solve_triangular(root(layer).to(right.dtype), rows, upper=False, left=False).view_as(right)

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [kv * d, m] -> [G, n, d, m] per query head
        return _per_query_head(t, layout.kv_heads, layout.heads).reshape(groups, n, d, -1)

    # K: per group and rotary pair, query head j's complex row [m] ~= alpha_j * c. Row j weighs by
    # its query pair's norm, since the error of its scores is |q_j| |k_j - alpha_j c|.
    zk = _complex_pairs(per_group(whitened(attn.k_proj))).transpose(1, 2)  # [G, d/2, n, m]
    zq = _complex_pairs(whitened(attn.q_proj).reshape(groups, n, d, -1))  # [G, n, d/2, m]
    weight = torch.linalg.vector_norm(zq, dim=-1).transpose(1, 2) + 1e-12  # [G, d/2, n]
    left, right = _factor((zk * weight[..., None]).unsqueeze(-2), 1)  # [G, d/2, n, 1, 1], [G, d/2, 1, m]
    rot, rot_inv = _align(right, zk.unsqueeze(-2))
    alpha = left[..., 0, 0] / weight * rot_inv[..., 0, 0, None]  # [G, d/2, n]
    new_k = _real_pairs(unwhiten(rot @ right, attn.k_proj).squeeze(-2)).reshape(groups * d, -1)
    zq = _complex_pairs(_with_bias(attn.q_proj).reshape(groups, n, d, -1))
    new_q = _real_pairs(zq * alpha.transpose(1, 2).conj().unsqueeze(-1)).reshape(layout.heads * d, -1)
    # V: factor the per-head output maps W_o,j W_v,j (what head j adds to the residual stream) into
    # B_j P: P is the merged value head, B_j query head j's new o_proj columns.
    v = per_group(whitened(attn.v_proj))  # [G, n, d, m]
    w_o = attn.o_proj.weight.detach().double().reshape(-1, groups, n, d).permute(1, 2, 0, 3)  # [G, n, hidden, d]
    b, right = _factor(w_o @ v, d)  # [G, n, hidden, d], [G, d, m]
    rot, rot_inv = _align(right, v)
    new_v = unwhiten(rot @ right, attn.v_proj).reshape(groups * d, -1)
    new_o = (b @ rot_inv.unsqueeze(1)).permute(2, 0, 1, 3).reshape(attn.o_proj.weight.shape)
    for name, extended in (("k_proj", new_k), ("v_proj", new_v)):
        old = getattr(attn, name)
        setattr(attn, name, _new_linear(old, *_set_with_bias(old, extended)))
    q_weight, q_bias = _set_with_bias(attn.q_proj, new_q)
    attn.q_proj.weight.copy_(q_weight)
    if q_bias is not None:
        attn.q_proj.bias.copy_(q_bias)
    attn.o_proj.weight.copy_(new_o.to(attn.o_proj.weight.dtype))


def pool_kv_heads(model: nn.Module, groups: int, init: str = "mean", seed: int = 0,
                  calibration: torch.Tensor | None = None) -> nn.Module:
    """Convert `model` in place to `groups` KV heads; `init` is auto | mean | first | random | svd (which
    also rewrites q_proj and o_proj, weighted by the attention inputs of the token rows `calibration`)."""
    check_pool_target(model.config, groups)
    init = resolve_init(model.config, init)
    if init == "svd" and (calibration is None or calibration.numel() == 0):
        raise ShrinkError("gqa.init=svd needs calibration token rows (its factorizations weigh by the attention "
                          "inputs' second moments); none given")
    layout = KVLayout.of(model.config)
    if init == "svd":  # layer by layer: each sees the inputs the layers already merged give it
        _svd_merge_layer_by_layer(model, layout, groups, calibration)
        return _set_kv_heads(model, groups)
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


def convert(model: nn.Module, mode: str, kv_heads: int | None, init: str = "mean", seed: int = 0,
            calibration: torch.Tensor | None = None) -> nn.Module:
    """The stage's conversion: `mode=pool` (to `kv_heads`, by `init`; svd uses the `calibration` token
    rows) or `mode=expand`."""
    if mode == "pool":
        if kv_heads is None:
            raise ShrinkError("gqa.kv_heads must be set for gqa.mode=pool")
        return pool_kv_heads(model, int(kv_heads), init, seed, calibration)
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
        check_init(config, init)
    elif mode == "expand":
        check_expand_target(config, int(kv_heads or KVLayout.of(config).heads))
    elif mode == "keep":
        pass
    else:
        raise ShrinkError(f"gqa.mode={mode!r}: expected pool, expand or keep")
