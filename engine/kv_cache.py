"""The paged KV cache: how many blocks the pool holds, and its tensors in every attention layer."""

from __future__ import annotations

import gc
import math

import torch

from engine.config import EngineConfig
from engine.context import Context, reset_context, set_context
from engine.layers.attention import Attention
from engine.parallel.group import all_reduce_min


def kv_bytes_per_token(layers: list[Attention], dtype: torch.dtype) -> int:
    return 2 * len(layers) * layers[0].num_kv_heads * layers[0].head_dim * dtype.itemsize


def allocate_kv_cache(config: EngineConfig, model: torch.nn.Module, layers: list[Attention],
                      extra_bytes_per_token: int = 0) -> int:
    """Give every attention layer its K and V pool [blocks, block_size, kv_heads, head_dim];
    returns the number of blocks. ``extra_bytes_per_token``: a second cache of the same number of
    blocks still to be allocated (a draft model's), counted when the pool is sized by free memory."""
    device, dtype, block_size = config.torch_device, config.torch_dtype, config.block_size
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif config.kv_cache_tokens is not None:
        num_blocks = math.ceil(config.kv_cache_tokens / block_size)
    elif device.type == "cuda":
        per_token = kv_bytes_per_token(layers, dtype) + extra_bytes_per_token
        num_blocks = _blocks_from_free_memory(config, model, per_token * block_size)
    else:
        tokens = min(config.max_num_seqs * config.max_model_len, 1 << 16)
        num_blocks = math.ceil(max(tokens, config.max_model_len) / block_size)
    num_blocks = all_reduce_min(num_blocks)  # tensor parallelism: a pool every rank holds
    if num_blocks * block_size < config.max_model_len:
        raise ValueError(
            f"num_kv_blocks: {num_blocks} blocks of {block_size} tokens cannot hold one sequence of "
            f"max_model_len={config.max_model_len}"
        )
    shape = (num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)
    for layer in layers:
        layer.k_cache = torch.empty(shape, dtype=dtype, device=device)
        layer.v_cache = torch.empty(shape, dtype=dtype, device=device)
    return num_blocks


def _blocks_from_free_memory(cfg: EngineConfig, model: torch.nn.Module, per_block: int) -> int:
    device = cfg.torch_device
    # An engine dropped earlier in this process may be garbage in a reference cycle: collect it
    # and return its cached blocks, or its pool would count as this engine's "current" memory.
    gc.collect()
    torch.cuda.empty_cache()
    # Peak activations of a full prefill step, measured by running one with no cache.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # A full step: max_num_batched_tokens tokens in sequences of up to max_model_len tokens.
    seq_len = min(cfg.max_num_batched_tokens, cfg.max_model_len)
    lens = [seq_len] * (cfg.max_num_batched_tokens // seq_len)
    if cfg.max_num_batched_tokens % seq_len:
        lens.append(cfg.max_num_batched_tokens % seq_len)
    tokens = sum(lens)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    set_context(Context(is_prefill=True, query_lens=lens, context_lens_host=lens))
    with torch.inference_mode():
        hidden = model(ids, positions)
        model.compute_logits(hidden[: min(len(hidden), cfg.max_num_seqs)]).float()
        del hidden
    reset_context()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    current = torch.cuda.memory_allocated()
    used_by_others = total - free - torch.cuda.memory_reserved()
    budget = total * cfg.gpu_memory_utilization - used_by_others - current - (peak - current)
    # Leave room for the CUDA graphs (their logits and activations), the sampler's fp32 copies
    # of the logits, and allocator fragmentation: a pool that leaves the allocator no slack
    # makes it free and re-allocate every step, which costs far more than the blocks gained.
    budget -= 4 * cfg.cuda_graph_max_bs * model.config.vocab_size * 4 + (1 << 30)
    return max(int(budget // per_block), 0)
