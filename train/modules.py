"""Finding the Hugging Face causal LM inside wrappers (DDP/FSDP `.module`, peft `get_base_model`)."""

from __future__ import annotations

from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The *ForCausalLM module: `.model` is its decoder, `.lm_head` its head.

    peft's PeftModel forwards attribute lookups, so `peft_model.model` is the CausalLM, not the
    decoder: unwrap explicitly. LoRA layers are injected in place, so the unwrapped modules still
    run the adapters."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
