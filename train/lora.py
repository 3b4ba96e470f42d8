"""Optional LoRA student through peft: only the adapters train; merged back at the end."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import SettingError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model: torch.nn.Module, spec: Any) -> torch.nn.Module:
    """Wrap `model` in LoRA adapters per `spec` (the `lora` setting: true or LoraConfig kwargs)."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(spec) if not isinstance(spec, bool) else {}
    kwargs.setdefault("r", 16)
    kwargs.setdefault("lora_alpha", 2 * int(kwargs["r"]))
    kwargs.setdefault("target_modules", DEFAULT_TARGETS)
    kwargs.setdefault("lora_dropout", 0.0)
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **kwargs)
    except TypeError as e:
        raise SettingError("lora", str(e)) from None
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
