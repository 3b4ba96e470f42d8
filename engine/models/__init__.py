"""Model families the engine runs. All Llama-like architectures share one implementation."""

from engine.models.llama import LlamaForCausalLM

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or [f"{config.model_type.capitalize()}ForCausalLM"]:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    raise NotImplementedError(f"unsupported architecture {config.architectures!r} (model_type {config.model_type!r})")
