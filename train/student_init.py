"""Student initialisation: from a config (scratch), or from the teacher by depth and width.

Depth keeps a subset of the teacher's decoder layers (`every:k`, `first:n`, a list, or
`importance:n` from measured layer scores, see train/importance.py). Width keeps the most
important MLP channels per layer and/or hidden (residual) channels across the whole model, as
Minitron does; the student is rebuilt from a narrower config and the kept slices are copied in.
The tokenizer is always the teacher's; a student brought from elsewhere must share its vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from common.errors import ShrinkError


def parse_keep_layers(spec: Any, n_layers: int, scores: Sequence[float] | None = None,
                      key: str = "student.keep_layers") -> list[int]:
    """`every:k` (0, k, 2k, ...), `first:n`, `importance:n` (needs `scores`), or explicit indices."""
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        try:
            k = int(arg)
        except ValueError:
            raise ShrinkError(f"{key}={spec!r}: expected every:k, first:n, importance:n or a list") from None
        if kind == "every" and k >= 1:
            layers = list(range(0, n_layers, k))
        elif kind == "first" and 1 <= k <= n_layers:
            layers = list(range(k))
        elif kind == "importance" and 1 <= k <= n_layers:
            if scores is None:
                raise ShrinkError(f"{key}={spec!r} needs layer importance scores (calibration data)")
            from train.importance import top_layers

            # The first and last layers carry the embedding/unembedding interface: always kept.
            layers = top_layers(list(scores), k, always_keep=(0, n_layers - 1))
        else:
            raise ShrinkError(f"{key}={spec!r}: expected every:k (k>=1), first:n or importance:n (1<=n<={n_layers})")
    else:
        layers = [int(i) for i in spec]
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= n_layers:
        raise ShrinkError(f"{key}={list(layers)}: need distinct indices in [0, {n_layers})")
    return sorted(layers)


def needs_importance(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("importance:")


def student_from_teacher(teacher: torch.nn.Module, keep: Sequence[int]) -> torch.nn.Module:
    """A deep copy of the teacher with only the decoder layers in `keep` (in order)."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        # The KV cache is indexed by layer_idx; it must follow the new numbering.
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    config = student.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def _keep_index(scores: torch.Tensor | None, weight_norms: torch.Tensor, n: int) -> torch.Tensor:
    s = scores if scores is not None else weight_norms
    return s.float().topk(n).indices.sort().values


def _slice_param(name: str, value: torch.Tensor, hidden_idx: torch.Tensor | None,
                 mlp_idx: dict[int, torch.Tensor]) -> torch.Tensor:
    """Cut one teacher tensor down to the narrower student's shape, by parameter role."""
    layer = None
    if ".layers." in name:
        layer = int(name.split(".layers.")[1].split(".")[0])
    h = hidden_idx
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return value[:, h] if h is not None else value
    if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or name == "model.norm.weight":
        return value[h] if h is not None else value
    if any(name.endswith(f"self_attn.{p}_proj.weight") for p in "qkv"):
        return value[:, h] if h is not None else value
    if ".self_attn.o_proj." in name:
        return value[h] if h is not None else value
    m = mlp_idx.get(layer) if layer is not None else None
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        value = value[m] if m is not None else value
        return value[:, h] if h is not None else value
    if name.endswith("mlp.down_proj.weight"):
        value = value[:, m] if m is not None else value
        return value[h] if h is not None else value
    return value


def prune_width(model: torch.nn.Module, hidden_size: int | None = None, intermediate_size: int | None = None,
                importance: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A narrower copy of a Llama-family model: the most important hidden / MLP channels kept
    (by activation importance when given, else by weight norm). Attention heads are unchanged."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    state = model.state_dict()
    importance = importance or {}
    h_idx = None
    if hidden_size is not None and hidden_size != config.hidden_size:
        if not 1 <= hidden_size < config.hidden_size:
            raise ShrinkError(f"student.width.hidden_size={hidden_size}: must be in [1, {config.hidden_size})")
        norms = state["model.embed_tokens.weight"].float().pow(2).sum(0)
        h_idx = _keep_index(importance.get("hidden"), norms, hidden_size)
        # head_dim stays the teacher's: it would otherwise be recomputed from the new hidden size.
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.hidden_size = hidden_size
    mlp_idx: dict[int, torch.Tensor] = {}
    if intermediate_size is not None and intermediate_size != config.intermediate_size:
        if not 1 <= intermediate_size < config.intermediate_size:
            raise ShrinkError(f"student.width.intermediate_size={intermediate_size}: must be in "
                              f"[1, {config.intermediate_size})")
        for i in range(config.num_hidden_layers):
            norms = state[f"model.layers.{i}.mlp.down_proj.weight"].float().pow(2).sum(0)
            mlp_idx[i] = _keep_index(importance.get(f"mlp.{i}"), norms, intermediate_size)
        config.intermediate_size = intermediate_size
    if h_idx is None and not mlp_idx:
        return model
    student = AutoModelForCausalLM.from_config(config).to(next(model.parameters()).dtype)
    new_state = {k: _slice_param(k, v, h_idx, mlp_idx).clone() for k, v in state.items()}
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ShrinkError(f"width pruning: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student.to(next(model.parameters()).device).train()


def student_from_config(teacher_config: Any, overrides: dict, key: str = "student.config") -> torch.nn.Module:
    """A randomly initialised student: the teacher's config with `overrides` (vocab unchanged)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher_config)
    for k, v in overrides.items():
        if k == "vocab_size" and int(v) != config.vocab_size:
            raise ShrinkError(f"{key}.vocab_size={v}: the student uses the teacher's tokenizer "
                              f"(vocab {config.vocab_size})")
        if not hasattr(config, k):
            raise ShrinkError(f"{key}.{k}: not a field of {type(config).__name__}")
        setattr(config, k, v)
    if "hidden_size" in overrides and "head_dim" not in overrides and hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    if getattr(config, "layer_types", None) and len(config.layer_types) != config.num_hidden_layers:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return AutoModelForCausalLM.from_config(config).train()


def check_same_vocab(teacher_tok: Any, student_tok: Any, teacher_vocab_size: int | None = None,
                     student_vocab_size: int | None = None, key: str = "student.path") -> None:
    """Logit distillation compares distributions id by id: the vocabularies must be identical."""
    if teacher_vocab_size is not None and student_vocab_size is not None and teacher_vocab_size != student_vocab_size:
        raise ShrinkError(f"{key}: the student's vocabulary has {student_vocab_size} entries, the teacher's "
                          f"{teacher_vocab_size}; logit distillation needs one vocabulary (use a student that "
                          f"shares the teacher's tokenizer, or student.init=teacher_layers)")
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        differ = sum(1 for tok, i in t_vocab.items() if s_vocab.get(tok) != i) + len(set(s_vocab) - set(t_vocab))
        raise ShrinkError(f"{key}: teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, "
                          f"{differ} map to different ids); logit distillation needs one vocabulary")


BUDGET_AXES = ("depth", "width")


def count_params(config: Any) -> int:
    """Parameters of a model of this config (built on the meta device: no memory, exact for any
    architecture; tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def shape_for_budget(config: Any, target_params: int, by: str = "depth") -> dict[str, int]:
    """The largest student of the teacher's `config` within `target_params`: `depth` keeps the most
    decoder layers that fit (which ones: importance), `width` keeps every layer and the widest MLP
    (a multiple of 8 channels) that fits. Returns {"layers", "intermediate_size", "params"}."""
    if by not in BUDGET_AXES:
        raise ShrinkError(f"student.budget_by={by!r}: expected one of {', '.join(BUDGET_AXES)}")
    teacher_params = count_params(config)
    if not 0 < target_params < teacher_params:
        raise ShrinkError(f"student.target_params={target_params:,} must be below the teacher's "
                          f"{teacher_params:,} parameters (and > 0)")

    def params(layers: int, intermediate: int) -> int:
        shaped = copy.deepcopy(config)
        shaped.num_hidden_layers, shaped.intermediate_size = layers, intermediate
        return count_params(shaped)

    n_layers, inter = config.num_hidden_layers, config.intermediate_size
    if by == "depth":
        fits = [n for n in range(1, n_layers) if params(n, inter) <= target_params]
        if not fits:
            raise ShrinkError(f"student.target_params={target_params:,}: even one layer has "
                              f"{params(1, inter):,} parameters; use student.budget_by=width or a larger target")
        return {"layers": fits[-1], "intermediate_size": inter, "params": params(fits[-1], inter)}
    lo, hi = 0, (inter - 1) // 8  # multiples of 8 in [8, inter): binary search, params grow with width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if params(n_layers, 8 * mid) <= target_params else (lo, mid - 1)
    if lo == 0:
        raise ShrinkError(f"student.target_params={target_params:,}: the embeddings and attention alone exceed it; "
                          f"use student.budget_by=depth or a larger target")
    return {"layers": n_layers, "intermediate_size": 8 * lo, "params": params(n_layers, 8 * lo)}
