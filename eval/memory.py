"""The KV memory planner from a model's config, beside what the engine actually allocated."""

from __future__ import annotations

from typing import Any

import torch


def planned_kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def engine_memory(llm: Any) -> dict[str, Any]:
    """The engine's KV pool as allocated (bytes of every layer's K and V tensors), its capacity in
    tokens, the planner's bytes per token for the engine's dtype, the weights' bytes in memory and how
    many linears it serves compressed (0 for a quantized artifact the engine served dequantized:
    EngineConfig.compressed_weights "auto" where dense decodes faster, engine/weight_form.py)."""
    from engine.layers.quantized import CompressedLinear

    runner = llm.engine.runner
    layers = runner.attn_layers
    pool_bytes = sum(layer.k_cache.nbytes + layer.v_cache.nbytes for layer in layers)
    capacity = runner.num_blocks * runner.block_size
    weights = {id(t): t.nbytes for t in list(runner.model.parameters()) + list(runner.model.buffers())}
    return {
        "kv_capacity_tokens": capacity,
        "kv_pool_MB": pool_bytes / 2**20,
        "kv_bytes_per_token_measured": pool_bytes // capacity,
        "kv_bytes_per_token_planned": planned_kv_bytes_per_token(llm.engine.config.hf_config, runner.dtype.itemsize),
        "engine_weights_MB": sum(weights.values()) / 2**20,
        "engine_compressed_linears": sum(isinstance(m, CompressedLinear) for m in runner.model.modules()),
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_MB(device: torch.device) -> float | None:
    """The GPU's peak allocation since the last reset; None on the CPU, where the process's peak
    resident set cannot be reset between artifacts (engine_weights_MB + kv_pool_MB say it there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
