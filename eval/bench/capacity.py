"""KV capacity: sequences of the workload that fit the pool with paging, against reserving
max_model_len per sequence."""

from __future__ import annotations

import gc

import torch

from eval.bench.common import RESULTS, log, shape_dir
from eval.bench.throughput import nano_vllm_workload


def capacity(args) -> None:
    """With the pool the engine sizes on this GPU: how many of the workload's sequences (at their
    final length) fit at once with paging, versus reserving max_model_len per sequence."""
    from engine.block_manager import BlockManager
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence

    path = shape_dir(args.shape)
    prompts, outputs = nano_vllm_workload()
    if args.kv_tokens is None:
        from engine import LLM

        llm = LLM(path, load_format="dummy", max_model_len=2048, enforce_eager=True)
        num_blocks, block_size = llm.engine.runner.num_blocks, llm.engine.config.block_size
        kv_tok = llm.engine.runner.kv_bytes_per_token
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    else:
        cfg = EngineConfig(model=path, max_model_len=2048, device="cpu")
        block_size = cfg.block_size
        num_blocks = args.kv_tokens // block_size
        hf = cfg.hf_config
        kv_tok = 2 * hf.num_hidden_layers * hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads) * 2
    pool_tokens = num_blocks * block_size
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    paged = 0
    for p, n in zip(prompts, outputs):
        seq = Sequence(p + [0] * n, SamplingParams())
        if not bm.can_allocate(seq):
            break
        bm.allocate(seq)
        paged += 1
    used = sum(len(p) + n for p, n in zip(prompts[:paged], outputs[:paged]))
    reserved = pool_tokens // 2048
    out = dict(pool_tokens=pool_tokens, pool_GB=pool_tokens * kv_tok / 1e9, kv_bytes_per_token=kv_tok,
               paged_sequences=paged, reserved_sequences=reserved, paged_tokens_held=used,
               reserved_tokens_held=sum(len(p) + n for p, n in zip(prompts[:reserved], outputs[:reserved])))
    RESULTS[f"capacity:{args.shape}"] = out
    log(f"KV capacity {args.shape}: pool {pool_tokens} tokens ({out['pool_GB']:.1f} GB, {kv_tok} B/token, blocks of {block_size})")
    log(f"  paged: {paged} of the workload's 256 sequences fit at their final length ({used} tokens held, "
        f"{100 * used / pool_tokens:.1f}% of the pool)")
    log(f"  reserving max_model_len=2048 per sequence: {reserved} sequences ({out['reserved_tokens_held']} tokens held, "
        f"{100 * out['reserved_tokens_held'] / pool_tokens:.1f}% of the pool)")
