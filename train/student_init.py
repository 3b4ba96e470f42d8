"""Student initialisation: from a config (scratch), or from the teacher by depth and width.

Depth keeps a subset of the teacher's decoder layers (`every:k`, `first:n`, a list, or
`importance:n` from measured layer scores, see train/importance.py). Width keeps the most
important MLP channels per layer, hidden (residual) channels across the whole model, and/or
attention heads per layer, as Minitron does; the student is rebuilt from a narrower config and
the kept slices are copied in. Heads are removed evenly from each GQA group (each key/value head
keeps its most important query heads), so the key/value heads and the grouping stay valid.
The tokenizer is always the teacher's; a student brought from elsewhere must share its vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from common.errors import ShrinkError


def head_dim(config: Any) -> int:
    """Channels per attention head of a Llama-family config (an explicit head_dim wins)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
                 mlp_idx: dict[int, torch.Tensor], q_idx: dict[int, torch.Tensor]) -> torch.Tensor:
    """Cut one teacher tensor down to the narrower student's shape, by parameter role."""
    layer = None
    if ".layers." in name:
        layer = int(name.split(".layers.")[1].split(".")[0])
    h = hidden_idx
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return value[:, h] if h is not None else value
    if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or name == "model.norm.weight":
        return value[h] if h is not None else value
    q = q_idx.get(layer) if layer is not None else None
    if name.endswith("self_attn.q_proj.bias"):
        return value[q] if q is not None else value
    if name.endswith("self_attn.q_proj.weight"):
        value = value[q] if q is not None else value
        return value[:, h] if h is not None else value
    if any(name.endswith(f"self_attn.{p}_proj.weight") for p in "kv"):
        return value[:, h] if h is not None else value
    if name.endswith("self_attn.o_proj.weight"):
        value = value[:, q] if q is not None else value
        return value[h] if h is not None else value
    m = mlp_idx.get(layer) if layer is not None else None
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        value = value[m] if m is not None else value
        return value[:, h] if h is not None else value
    if name.endswith("mlp.down_proj.weight"):
        value = value[:, m] if m is not None else value
        return value[h] if h is not None else value
    return value


def _kept_query_channels(scores: torch.Tensor, n_kv: int, per_group: int, head_dim: int) -> torch.Tensor:
    """q_proj rows of the `per_group` most important query heads of each GQA group (groups in order)."""
    groups = scores.float().reshape(n_kv, -1)
    heads = (groups.topk(per_group, dim=1).indices.sort(dim=1).values
             + torch.arange(n_kv).unsqueeze(1) * groups.shape[1]).reshape(-1)
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def prune_width(model: torch.nn.Module, hidden_size: int | None = None, intermediate_size: int | None = None,
                importance: dict[str, torch.Tensor] | None = None,
                num_attention_heads: int | None = None) -> torch.nn.Module:
    """A narrower copy of a Llama-family model: the most important hidden / MLP channels and
    attention heads kept (by activation importance when given, else by weight norm)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    state = model.state_dict()
    importance = importance or {}
    hd = head_dim(config)
    h_idx = None
    if hidden_size is not None and hidden_size != config.hidden_size:
        if not 1 <= hidden_size < config.hidden_size:
            raise ShrinkError(f"student.width.hidden_size={hidden_size}: must be in [1, {config.hidden_size})")
        norms = state["model.embed_tokens.weight"].float().pow(2).sum(0)
        h_idx = _keep_index(importance.get("hidden"), norms, hidden_size)
    mlp_idx: dict[int, torch.Tensor] = {}
    if intermediate_size is not None and intermediate_size != config.intermediate_size:
        if not 1 <= intermediate_size < config.intermediate_size:
            raise ShrinkError(f"student.width.intermediate_size={intermediate_size}: must be in "
                              f"[1, {config.intermediate_size})")
        for i in range(config.num_hidden_layers):
            norms = state[f"model.layers.{i}.mlp.down_proj.weight"].float().pow(2).sum(0)
            mlp_idx[i] = _keep_index(importance.get(f"mlp.{i}"), norms, intermediate_size)
    q_idx: dict[int, torch.Tensor] = {}
    if num_attention_heads is not None and num_attention_heads != config.num_attention_heads:
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if not (n_kv <= num_attention_heads < config.num_attention_heads and num_attention_heads % n_kv == 0):
            raise ShrinkError(f"student.width.num_attention_heads={num_attention_heads}: must be a multiple of the "
                              f"{n_kv} key/value heads below {config.num_attention_heads} (heads leave each GQA "
                              f"group evenly)")
        for i in range(config.num_hidden_layers):
            o_proj = state[f"model.layers.{i}.self_attn.o_proj.weight"].float()
            norms = o_proj.pow(2).sum(0).reshape(-1, hd).sum(1)
            scores = importance.get(f"heads.{i}")
            q_idx[i] = _kept_query_channels(scores if scores is not None else norms, n_kv,
                                            num_attention_heads // n_kv, hd)
    if h_idx is None and not mlp_idx and not q_idx:
        return model
    heads, hidden = num_attention_heads or config.num_attention_heads, hidden_size or config.hidden_size
    if hidden % heads:  # transformers validates this when it saves the config: fail before any training
        keys = "student.width.hidden_size" + (" / student.width.num_attention_heads" if q_idx else "")
        raise ShrinkError(f"{keys}: the hidden size {hidden} must be a multiple of the {heads} attention heads "
                          f"(transformers refuses to save a Llama config otherwise)")
    # head_dim stays the teacher's: it would otherwise be recomputed from the new hidden size or heads.
    config.head_dim = hd
    config.hidden_size = hidden_size if h_idx is not None else config.hidden_size
    config.intermediate_size = intermediate_size if mlp_idx else config.intermediate_size
    config.num_attention_heads = num_attention_heads if q_idx else config.num_attention_heads
    weight = next(model.parameters())
    # Built on the meta device and materialised where the teacher's copy lives: every weight is then
    # copied from the kept slices, so a random initialisation on the host (and the weights' trip to
    # the host and back) would be thrown away.
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    student.to_empty(device=weight.device)
    new_state = {k: _slice_param(k, v, h_idx, mlp_idx, q_idx) for k, v in state.items()}
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)  # a tied head is the embedding: nothing to load
    if unexpected or [k for k in missing if not (tied and "lm_head" in k)]:
        raise ShrinkError(f"width pruning: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    _copy_buffers(model, student)
    student.tie_weights()
    return student.train()


def _copy_buffers(source: torch.nn.Module, student: torch.nn.Module) -> None:
    """The student's buffers (the rotary inverse frequencies, which no state dict holds) from the model
    it was cut from: width pruning keeps head_dim and the rotary settings, so they are the same values."""
    buffers = dict(source.named_buffers())
    for name, buf in student.named_buffers():
        if name not in buffers or buffers[name].shape != buf.shape:
            raise ShrinkError(f"width pruning: the student's buffer {name} has no counterpart of shape "
                              f"{tuple(buf.shape)} in the model it is cut from")
        buf.copy_(buffers[name])


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
