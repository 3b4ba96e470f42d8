"""TrainConfig: every knob of the distillation loop, checked before any work. Its defaults are those of
conf/train/default.yaml, the config group that distill, gqa.train and prune.finetune compose."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from common.errors import SettingError

# The layer losses train/layer_distill.py computes; named here, not imported from there (torch), so that
# `python -m shrink` checks its config before it imports torch.
LAYER_LOSSES = ("mse", "cosine")


def check_value(key: str, value: Any, hint: Any) -> None:
    """Raise a SettingError naming `key` unless `value` (as the config composed it) fits the type `hint`:
    int (not bool, not 2.7), a finite float, bool, str, X | None, dict, list, or Any."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    hint = origin or hint
    if hint is Any:
        return
    if value is None:
        raise SettingError(key, "needs a value, got null", sep=" ")
    if hint is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    elif hint is dict:
        ok, wanted = isinstance(value, typing.Mapping), "a mapping {key: value}"
    elif hint is list:
        ok, wanted = isinstance(value, (list, tuple)), "a list [a, b, ...]"
    elif hint is str:
        ok, wanted = not isinstance(value, (typing.Mapping, list, tuple)), "a string"
    else:
        raise TypeError(f"check_value: unsupported type {hint!r} for {key}")
    if not ok:
        raise SettingError(key, f"expected {wanted}, got {value!r}")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8            # sequences per device per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    chunk_size: int = 1024         # tokens per loss chunk (bounds fp32 [tokens x vocab] memory)
    fused_head_loss: bool = True   # fused head + loss (train/fused_head_loss.py); False: checkpoint path
    compile_loss: Any = "auto"     # torch.compile the fused per-chunk terms: auto (on CUDA) | true | false
    compile_model: Any = "auto"    # torch.compile the decoder layers (train/compiled_layers.py): auto | true | false
    losses: dict[str, Any] = field(default_factory=lambda: {"forward_kl": 1.0, "ce": 0.5})
    temperature: float = 2.0
    top_k: int | None = None       # truncate the teacher to its top-k tokens (see chunked_loss)
    layer_map: Any = None          # resolved list of LayerPair (the stage turns `auto` into pairs)
    layer_loss: str = "cosine"     # mse | cosine
    layer_weight: float = 0.0      # weight of the intermediate-layer term in the total
    lmbda: float = 0.0             # GKD: probability that a step trains on student samples
    seq_kd: bool = False           # sequence-level KD: otherwise, teacher-written continuations
    prompt_len: int = 64           # on-policy / seq-KD prompt: the first tokens of each block
    max_new_tokens: int = 64
    gen_temperature: float = 1.0
    lora: Any = None               # peft LoraConfig kwargs (r, lora_alpha, target_modules, ...)
    qat: dict[str, Any] | None = None  # quantization-aware training: {bits, group_size, symmetric, start}
    checkpoint_every: int = 100
    eval_every: int = 0
    val_batches: int = 8
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: Any, seed: int, block_size: int) -> "TrainConfig":
        """The settings of one training config section, checked; errors name the setting only (the
        caller's `config_section` names the section)."""
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        hints = typing.get_type_hints(cls)
        known = set(cls.__dataclass_fields__) - {"seed"}
        values = {k: v for k, v in raw.items() if k in known}
        for key, value in values.items():
            check_value(key, value, hints[key])
        check_value("tokens", raw.get("tokens"), int | None)
        tc = cls(**values, seed=seed)
        if raw.get("tokens"):
            tc.max_steps = max(1, math.ceil(int(raw["tokens"]) / (tc.batch_size * tc.grad_accum * block_size)))
        tc.validate()
        return tc

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}", sep=" ")
        if self.lr <= 0:
            raise SettingError("lr", f"must be > 0, got {self.lr}", sep=" ")
        if self.temperature <= 0:
            raise SettingError("temperature", f"must be > 0, got {self.temperature}", sep=" ")
        if not self.losses:
            raise SettingError("losses", "is empty: name at least one loss with a weight", sep=" ")
        if not isinstance(self.fused_head_loss, bool):
            raise SettingError("fused_head_loss", f"must be true or false, got {self.fused_head_loss!r}", sep=" ")
        if not (self.compile_loss == "auto" or isinstance(self.compile_loss, bool)):
            raise SettingError("compile_loss", f"must be auto, true or false, got {self.compile_loss!r}", sep=" ")
        if not (self.compile_model == "auto" or isinstance(self.compile_model, bool)):
            raise SettingError("compile_model", f"must be auto, true or false, got {self.compile_model!r}", sep=" ")
        if self.compile_model is True and (self.lmbda > 0 or self.seq_kd):
            raise SettingError("compile_model", "true does not apply to on-policy / seq-KD steps (lmbda > 0 or "
                               "seq_kd): generation runs the layers with a KV cache; use auto or false", sep=" ")
        if self.top_k is not None and int(self.top_k) < 1:
            raise SettingError("top_k", f"must be >= 1 or null, got {self.top_k}", sep=" ")
        if self.layer_loss not in LAYER_LOSSES:
            raise SettingError("layer_loss", f"{self.layer_loss!r}: expected one of {LAYER_LOSSES}", sep="=")
        if not 0.0 <= float(self.lmbda) <= 1.0:
            raise SettingError("lmbda", f"must be in [0, 1], got {self.lmbda}", sep=" ")
        for name in ("prompt_len", "max_new_tokens"):
            if (self.lmbda > 0 or self.seq_kd) and getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1 for on-policy / seq-KD, got {getattr(self, name)}", sep=" ")
        if self.warmup_steps < 0:
            raise SettingError("warmup_steps", f"must be >= 0, got {self.warmup_steps}", sep=" ")
        if self.qat and self.lora:
            # LoRA's output adds its adapters' delta in full precision beside the base weight: the forward would
            # not be the quantized model's, and the merged weights would need a snap of their own.
            raise SettingError("qat", "does not combine with lora (the adapters' delta is not on the grid): "
                                      "train the full student, or set one of them to null", sep=" ")


# TrainConfig knobs that belong to training a student model, not heads on a frozen teacher (off when falsy).
# Checked here, not in train/medusa.py (torch), so that `python -m shrink` checks its config before torch.
NOT_FOR_HEADS = ("layer_map", "layer_weight", "lmbda", "seq_kd", "lora", "qat")


def check_head_config(tc: TrainConfig, num_heads: int, block_size: int) -> None:
    """Refuse what does not apply to heads, naming the setting (the caller's config_section names the section)."""
    for key in NOT_FOR_HEADS:
        value = getattr(tc, key)
        if value:
            raise SettingError(key, f"does not apply to Medusa heads (got {value!r}): they train on a frozen "
                                    "teacher's final hidden states; leave it at its default", sep=" ")
    if block_size < num_heads + 2:
        raise SettingError("medusa.num_heads", f"{num_heads} needs data.block_size >= num_heads + 2 = "
                           f"{num_heads + 2} (head i predicts token t + 2 + i), got {block_size}", sep="=")
