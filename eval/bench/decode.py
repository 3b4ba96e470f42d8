"""Decode speed: the engine against transformers' static-cache generate, and the bandwidth roofline."""

from __future__ import annotations

import gc
import os
import statistics
from typing import Any

import torch

from eval.bench.ceilings import ceilings
from eval.bench.common import RESULTS, engine_options, log, prompts, shape_dir, timed, weight_bytes


def hf_static_decode(model_dir: str | None, shape: str | None, batches: list[int], new_tokens: int, prompt_len: int,
                     compile: bool = False) -> dict:
    """transformers generate with a static cache; ``compile`` lets generate torch.compile the forward
    (its default with a static cache), else ``disable_compile=True``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape:
        config = AutoConfig.from_pretrained(shape_dir(shape))
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    model.eval()
    out = {}
    for bs in batches:
        ids = torch.tensor(prompts(bs, prompt_len, model.config.vocab_size, bs), device="cuda")
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not compile)
        with torch.no_grad():
            # Warm-up; compiled, it must have the timed run's shapes (the static cache is sized by
            # max_new_tokens, and a new size recompiles inside the timed run).
            model.generate(ids, **(kw if compile else {**kw, "max_new_tokens": 8, "min_new_tokens": 8}))
            _, dt = timed(lambda: model.generate(ids, **kw))
        out[bs] = bs * new_tokens / dt
        log(f"  transformers static cache{' compiled' if compile else ''} batch {bs:3d}: {out[bs]:9.1f} tok/s ({bs * new_tokens} tokens in {dt:.2f} s)")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def engine_decode(model_dir: str, dummy: bool, batches: list[int], new_tokens: int, prompt_len: int,
                  **cfg: Any) -> dict:
    from engine import LLM, SamplingParams

    max_bs = max(batches)
    llm = LLM(model_dir, load_format="dummy" if dummy else "safetensors", max_num_seqs=max_bs,
              cuda_graph_max_bs=max_bs, max_model_len=prompt_len + new_tokens + 16,
              enable_prefix_caching=False, **cfg)
    vocab = llm.engine.vocab_size
    runner = llm.engine.runner
    log(f"  fused decode up to {runner.model.model.fused_rows} rows; timed per bucket (fused/unfused us): "
        f"{ {b: (round(t['fused'], 1), round(t['unfused'], 1)) for b, t in runner.fused_rows_us.items()} }")
    out = {}
    for bs in batches:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts(bs, prompt_len, vocab, 1000 + bs), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        # Median of three timed runs: one run can catch a one-off stall (BENCHMARKS.md, fourth session).
        runs = []
        for _ in range(3):
            res, dt = timed(lambda: llm.generate(prompts(bs, prompt_len, vocab, bs), params))
            assert all(len(r.token_ids) == new_tokens for r in res)
            runs.append(dt)
        dt = statistics.median(runs)
        out[bs] = bs * new_tokens / dt
        log(f"  engine (CUDA graphs)       batch {bs:3d}: {out[bs]:9.1f} tok/s ({bs * new_tokens} tokens in {dt:.2f} s)")
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def decode(args) -> None:
    label = args.shape or os.path.basename(os.path.normpath(args.model))
    path = shape_dir(args.shape) if args.shape else args.model
    log(f"decode {label}: {args.new_tokens} new tokens after a {args.prompt_len}-token prompt, bf16, greedy")
    res: dict[str, Any] = {}
    if args.hf:
        res["transformers_static"] = hf_static_decode(args.model, args.shape, args.batch, args.new_tokens, args.prompt_len,
                                                      compile=args.hf_compile)
    res["engine"] = engine_decode(path, bool(args.shape), args.batch, args.new_tokens, args.prompt_len,
                                  **engine_options(args.engine))
    if args.roofline:
        from transformers import AutoConfig

        bw = RESULTS.get("ceilings", {}).get("copy_bandwidth_TBps") or ceilings()["copy_bandwidth_TBps"]
        wb = weight_bytes(AutoConfig.from_pretrained(path))
        roof = bw * 1e12 / wb
        res["roofline_tok_s"] = roof
        res["weight_bytes"] = wb
        b1 = res["engine"].get(1)
        if b1:
            log(f"  roofline at batch 1: {wb / 1e9:.2f} GB of weights / {bw:.2f} TB/s = {roof:.0f} tok/s; "
                f"engine reaches {100 * b1 / roof:.1f}%")
    if args.hf:
        for bs, v in res["engine"].items():
            log(f"  speed-up over transformers at batch {bs}: {v / res['transformers_static'][bs]:.2f}x")
    RESULTS[f"decode:{label}"] = res
