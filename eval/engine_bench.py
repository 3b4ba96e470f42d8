"""Engine benchmarks: decode speed against transformers, bandwidth roofline, throughput on
nano-vllm's workload, KV capacity, and greedy agreement with transformers on a real model.

    python -m eval.engine_bench ceilings
    python -m eval.engine_bench decode --model DIR --batch 1 16 64 --new-tokens 256 --hf
    python -m eval.engine_bench decode --shape llama2-7b --batch 1 --hf --roofline
    python -m eval.engine_bench throughput --shape tinyllama [--prefill-attention sdpa]
    python -m eval.engine_bench capacity --shape tinyllama
    python -m eval.engine_bench agreement --model DIR
    python -m eval.engine_bench convert-gguf --gguf FILE --out DIR
    python -m eval.engine_bench host --batch 1 8 64 --steps 512        # CPU: host time per decode step
    python -m eval.engine_bench profile --shape smollm2-135m --batch 1   # step vs graph vs kernels

Every figure printed is measured in this process; baselines run in the same process, first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B (intermediate 5632, 22 layers, GQA 32/4) and Llama-2-7B shapes, random weights.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_theta=100000.0),
}

RESULTS: dict[str, Any] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def shape_dir(name: str) -> str:
    """A directory holding only config.json: the engine loads it with load_format='dummy'."""
    from transformers import LlamaConfig

    path = os.path.join(tempfile.gettempdir(), f"shape-{name}")
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


def weight_bytes(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step reads (embedding rows are gathered, not read whole)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    hd = getattr(config, "head_dim", None) or h // heads
    per_layer = h * (heads * hd + 2 * kv * hd) + heads * hd * h + 3 * h * i + 2 * h
    return dtype_bytes * (layers * per_layer + config.vocab_size * h + h)


def timed(fn):
    """(fn(), seconds), the device synchronised before and after when there is one."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t


# -- device ceilings ------------------------------------------------------------------------------
def ceilings() -> dict[str, float]:
    import triton.testing

    n = 1 << 30  # 2 GiB of bf16
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    bw = 2 * x.numel() * 2 / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    out = {"copy_bandwidth_TBps": bw / 1e12, "bf16_matmul_TFLOPs": flops / 1e12}
    log(f"ceilings: device-to-device copy {bw / 1e12:.2f} TB/s (read+write), bf16 8192^3 matmul {flops / 1e12:.0f} TFLOP/s")
    RESULTS["ceilings"] = out
    return out


# -- decode ------------------------------------------------------------------------------------------
def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=g).tolist()


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
        ids = torch.tensor(_prompts(bs, prompt_len, model.config.vocab_size, bs), device="cuda")
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


def engine_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--engine key=value ...` -> EngineConfig overrides (ints, floats, true/false parsed)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine: expected key=value, got {pair!r}")
        low = raw.lower()
        if low in ("true", "false"):
            value: Any = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key] = value
    return out


def engine_decode(model_dir: str, dummy: bool, batches: list[int], new_tokens: int, prompt_len: int,
                  **cfg: Any) -> dict:
    from engine import LLM, SamplingParams

    max_bs = max(batches)
    llm = LLM(model_dir, load_format="dummy" if dummy else "safetensors", max_num_seqs=max_bs,
              cuda_graph_max_bs=max_bs, max_model_len=prompt_len + new_tokens + 16,
              enable_prefix_caching=False, **cfg)
    vocab = llm.engine.vocab_size
    out = {}
    for bs in batches:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(_prompts(bs, prompt_len, vocab, 1000 + bs), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        res, dt = timed(lambda: llm.generate(_prompts(bs, prompt_len, vocab, bs), params))
        assert all(len(r.token_ids) == new_tokens for r in res)
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


# -- throughput (nano-vllm's bench) ---------------------------------------------------------------
def nano_vllm_workload(num_seqs: int = 256, max_input: int = 1024, max_output: int = 1024):
    """Same draws, in the same order, as nano-vllm's bench.py with seed 0."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input))] for _ in range(num_seqs)]
    outputs = [random.randint(100, max_output) for _ in range(num_seqs)]
    return prompts, outputs


class KernelWindow:
    """torch.profiler over engine steps [first, last) of a run: the GPU-busy fraction of that
    window (union of kernel intervals / its wall time). Tracing a whole throughput run would hold
    hundreds of thousands of events; a window of steps is enough to see where the time goes."""

    def __init__(self, spec: str | None) -> None:
        self.first, self.last = (int(x) for x in spec.split(":")) if spec else (-1, -1)
        self.prof = None
        self.result: dict | None = None

    def at_step(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if step == self.first:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif step == self.last and self.prof is not None:
            from eval.decode_profile import kernel_events, busy_fraction

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall_us = 1e6 * (time.perf_counter() - self.t0)
            self.prof.stop()
            kernels = kernel_events(self.prof)
            spans = [(e.time_range.start, e.time_range.end) for e in kernels]
            self.result = {"first_step": self.first, "last_step": self.last - 1, "wall_s": wall_us / 1e6,
                           "kernel_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
                           "gpu_busy": busy_fraction(spans, wall_us)}
            self.prof = None


def throughput(args) -> None:
    from engine import LLM, SamplingParams

    path = shape_dir(args.shape)
    prompts, outputs = nano_vllm_workload()
    llm = LLM(path, load_format="dummy", max_model_len=2048, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, prefill_attention=args.prefill_attention)
    eng = llm.engine
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in outputs]
    llm.generate(["Benchmark: "] if eng.tokenizer else [[1, 2, 3]], SamplingParams(max_tokens=4))  # warm-up

    # Per-step accounting: wall time in the model runner (GPU work + launch + sync) vs. the rest.
    runner, stats = eng.runner, {"prefill_s": 0.0, "decode_s": 0.0, "prefill_steps": 0, "decode_steps": 0,
                                 "kv_read_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0, "max_running": 0,
                                 "decode_forwards": 0}
    inner = runner.run
    window = KernelWindow(args.profile_steps)

    def timed_run(batch):
        window.at_step(stats["prefill_steps"] + stats["decode_steps"])
        t = time.perf_counter()
        result = inner(batch)  # returns after .tolist(): the GPU is done
        dt = time.perf_counter() - t
        kind = "prefill" if batch.is_prefill else "decode"
        steps = getattr(batch, "num_steps", 1)  # a multi-step decode runs that many forwards
        stats[f"{kind}_s"] += dt
        stats[f"{kind}_steps"] += 1
        stats[f"{kind}_tokens"] += sum(batch.num_scheduled) * steps
        if not batch.is_prefill:
            stats["decode_forwards"] += steps
            stats["kv_read_tokens"] += sum(s.num_tokens for s in batch.seqs) * steps
        stats["max_running"] = max(stats["max_running"], len(eng.scheduler.running))
        return result

    runner.run = timed_run
    res, dt = timed(lambda: llm.generate(prompts, params))
    total_out = sum(len(r.token_ids) for r in res)
    assert total_out == sum(outputs)
    tput = total_out / dt
    cfg = eng.config.hf_config
    wb = weight_bytes(cfg)
    kv_tok = runner.kv_bytes_per_token
    ceil = RESULTS.get("ceilings") or ceilings()
    n_params = wb / 2
    flops = 2 * n_params * (stats["prefill_tokens"] + stats["decode_tokens"])
    compute_roof_s = flops / (ceil["bf16_matmul_TFLOPs"] * 1e12)
    bytes_moved = stats["decode_forwards"] * wb + stats["kv_read_tokens"] * kv_tok
    bw_roof_s = bytes_moved / (ceil["copy_bandwidth_TBps"] * 1e12)
    other = dt - stats["prefill_s"] - stats["decode_s"]
    out = dict(output_tokens=total_out, seconds=dt, output_tok_s=tput, preemptions=eng.scheduler.num_preemptions,
               kv_blocks=runner.num_blocks, block_size=eng.config.block_size, **stats,
               compute_roof_s=compute_roof_s, bandwidth_roof_s=bw_roof_s, scheduler_and_host_s=other)
    RESULTS[f"throughput:{args.shape}"] = out
    log(f"throughput {args.shape}, prefill attention {args.prefill_attention} (nano-vllm workload: 256 requests, in/out uniform 100..1024, seed 0, ignore EOS, T=0.6):")
    log(f"  {total_out} output tokens in {dt:.2f} s = {tput:.0f} output tok/s; preemptions {eng.scheduler.num_preemptions}; "
        f"KV pool {runner.num_blocks * eng.config.block_size} tokens; peak running {stats['max_running']}")
    log(f"  time: prefill steps {stats['prefill_s']:.2f} s ({stats['prefill_steps']} steps, {stats['prefill_tokens']} tokens), "
        f"decode steps {stats['decode_s']:.2f} s ({stats['decode_steps']} steps), scheduler+host outside the runner {other:.2f} s")
    log(f"  roofs: compute {compute_roof_s:.2f} s (2*params*tokens at {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s, attention FLOPs "
        f"excluded), bandwidth {bw_roof_s:.2f} s (weights per decode step + KV read at {ceil['copy_bandwidth_TBps']:.2f} TB/s)")
    if window.result is not None:
        out["profile_window"] = window.result
        w = window.result
        log(f"  GPU busy {100 * w['gpu_busy']:.1f}% of engine steps {w['first_step']}..{w['last_step']} "
            f"({w['wall_s']:.2f} s traced, kernels {w['kernel_s']:.2f} s)")
    del llm
    gc.collect()
    torch.cuda.empty_cache()


# -- KV capacity --------------------------------------------------------------------------------------
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


# -- greedy agreement ---------------------------------------------------------------------------------
AGREEMENT_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "To make a cup of tea, first", "In 1969, the Apollo 11 mission",
    "Photosynthesis is the process by which", "The quick brown fox", "import numpy as np\n\n",
    "Here is a list of healthy breakfast ideas:\n1.", "The difference between a list and a tuple in Python is",
    "Q: What is 12 times 7?\nA:", "Dear hiring manager,", "The mitochondria is", "Translate to French: Good morning",
    "A haiku about autumn:\n", "The best way to learn a language is", "SELECT name FROM users WHERE",
    "Water boils at", "The theory of relativity states that", "My favourite book is", "Climate change is caused by",
    "How do airplanes fly?", "The history of the Roman Empire", "Write a short poem about the sea.",
    "The main ingredients of bread are", "Machine learning is a field that", "The largest planet in our solar system",
    "Steps to change a flat tire:", "Once the sun had set,", "A good night's sleep helps", "Explain recursion to a child:",
]


def agreement(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(args.model)
    n_new = args.new_tokens
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    ref_tokens, ref_scores = [], []
    with torch.no_grad():
        for p in AGREEMENT_PROMPTS:
            ids = torch.tensor([tok.encode(p)], device="cuda")
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                            do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            ref_tokens.append(g.sequences[0, ids.shape[1]:].tolist())
            ref_scores.append(torch.stack([s[0].float() for s in g.scores]))
    del hf
    torch.cuda.empty_cache()
    llm = LLM(args.model, max_model_len=512, max_num_seqs=64)
    outs = llm.generate([tok.encode(p) for p in AGREEMENT_PROMPTS],
                        SamplingParams(temperature=0, max_tokens=n_new, min_tokens=n_new, logprobs=5))
    same_seq, same_tok, total, divergences = 0, 0, 0, []
    for i, (o, ref, scores) in enumerate(zip(outs, ref_tokens, ref_scores)):
        total += n_new
        if o.token_ids == ref:
            same_seq += 1
            same_tok += n_new
            continue
        j = next(k for k in range(n_new) if o.token_ids[k] != ref[k])
        same_tok += j
        row = scores[j]
        hf_gap = (row[ref[j]] - row[o.token_ids[j]]).item()  # HF's logit margin for its own choice
        lp = o.logprobs[j]
        # nan: transformers' token is not among the engine's top 5 there (a tie of several tokens).
        eng_gap = lp[o.token_ids[j]].logprob - lp.get(ref[j]).logprob if ref[j] in lp else float("nan")
        ulp = 2.0 ** (torch.floor(torch.log2(row[ref[j]].abs())).item() - 7)  # bf16 spacing at that logit
        divergences.append(dict(prompt=i, position=j, hf_logit_gap=hf_gap, engine_logprob_gap=eng_gap, bf16_ulp=ulp))
    out = dict(sequences=len(outs), identical_sequences=same_seq, tokens_before_divergence=same_tok,
               tokens_total=total, divergences=divergences)
    RESULTS["agreement"] = out
    log(f"greedy agreement, {args.model} bf16, {len(outs)} prompts x {n_new} tokens vs transformers bf16 (one prompt at a time; "
        f"EOS masked on both sides: min_new_tokens / min_tokens):")
    log(f"  identical sequences {same_seq}/{len(outs)}; divergence rate {100 * (len(outs) - same_seq) / len(outs):.1f}% "
        f"of sequences; tokens matching up to the first divergence {same_tok}/{total}")
    for d in divergences:
        log(f"  prompt {d['prompt']:2d} diverges at token {d['position']:3d}: transformers' top-1 leads the engine's token "
            f"by {d['hf_logit_gap']:.4f} logits (bf16 ulp there {d['bf16_ulp']:.4f}); engine's margin the other way "
            + (f"{d['engine_logprob_gap']:.4f} nats" if d["engine_logprob_gap"] == d["engine_logprob_gap"]
               else "not measured (transformers' token is not in the engine's top 5)"))


# -- host overhead per decode step ----------------------------------------------------------------
HOST_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5)


def host_overhead(args) -> dict:
    """Microseconds of host work per decode step, by phase, with the real engine (scheduler, block
    manager, input building, sampler, output handling) on a 1-layer hidden-64 model, on the CPU.

    Phases are timed by wrapping the engine's methods on the instance, so the engine itself carries
    no instrumentation: schedule = Scheduler.schedule; forward = the model's forward + LM head;
    sample = Sampler.sample_step (and a multi-step's DecodeInputs.fetch_tokens, the wait for its
    tokens); prepare = the rest of ModelRunner.run (input tensors, context,
    CUDA-graph buffers on a GPU); postprocess = the rest of LLMEngine.step (progress, appending
    tokens, stop checks, removing finished sequences); loop = LLM.generate outside step(). Only
    decode steps are counted. By default the forward is stubbed (fixed outputs; see below); with
    --forward real it is the CPU's eager forward of the tiny model. On a GPU it is one graph replay,
    so "host total" (everything but forward) is the figure that carries over. With --device cuda
    and CUDA graphs, forward is the replay's launch and "sample" includes waiting for the GPU.
    """
    from transformers import LlamaConfig

    from engine import LLM, SamplingParams

    path = os.path.join(tempfile.gettempdir(), f"shape-host-v{args.vocab}")
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**HOST_SHAPE, vocab_size=args.vocab, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    torch.set_num_threads(1)
    max_bs = max(args.batch)
    llm = LLM(path, load_format="dummy", device=args.device, max_num_seqs=max_bs, cuda_graph_max_bs=max_bs,
              max_model_len=args.prompt_len + args.steps + 16, enable_prefix_caching=False)
    eng, runner = llm.engine, llm.engine.runner
    phases = ("schedule", "prepare", "forward", "sample", "postprocess", "loop")
    acc: dict[str, float] = {}
    state = {"decode": False}

    def timed(obj, name, key, on_result=None):
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = inner(*a, **kw)
            dt = time.perf_counter() - t
            if on_result is not None:
                on_result(out)
            if state["decode"]:
                acc[key] = acc.get(key, 0.0) + dt
            return out

        setattr(obj, name, wrapper)

    def note_kind(batch):  # the phase of the step being timed decides whether it counts
        state["decode"] = batch is not None and not batch.is_prefill

    if args.forward == "stub":
        # The forward reduced to returning fixed tensors (what a CUDA-graph replay costs the host is
        # a few us): the CPU's eager forward of even this model takes ~1.5 ms, evicts the caches
        # and churns the allocator, which inflates and blurs the host phases around it.
        hidden = torch.zeros(eng.config.max_num_batched_tokens, HOST_SHAPE["hidden_size"], dtype=runner.dtype,
                             device=runner.device)
        logits = torch.randn(max_bs, args.vocab, generator=torch.Generator().manual_seed(0)).to(runner.device, runner.dtype)
        runner.model.forward = lambda ids, positions: hidden[: ids.shape[0]]
        runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    timed(eng.scheduler, "schedule", "schedule", note_kind)
    timed(runner, "run", "run")
    timed(runner.model, "forward", "forward")
    timed(runner.model, "compute_logits", "forward")
    timed(runner.sampler, "sample_step", "sample")
    timed(runner.decode_inputs, "fetch_tokens", "sample")
    for graph in runner.graphs.graphs.values() if runner.graphs else []:  # CUDA: the replay's launch is the forward's host cost
        timed(graph, "replay", "forward")
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    inner_step = eng.step
    step_s = {"t": 0.0, "decode_steps": 0}

    def step():
        t = time.perf_counter()
        out = inner_step()
        dt = time.perf_counter() - t
        step_s["t"] += dt
        if state["decode"]:
            acc["step"] = acc.get("step", 0.0) + dt
            step_s["decode_steps"] += 1
        state["decode"] = False
        return out

    eng.step = step
    vocab = eng.vocab_size
    out: dict[int, dict[str, float]] = {}
    log(f"host overhead per decode step: device {runner.device}, forward {args.forward}, 1 layer, hidden 64, vocab {vocab}, "
        f"{args.prompt_len}-token prompts, {args.steps} greedy steps, best of {args.repeat} (us per step)")
    log(f"  {'batch':>5} " + " ".join(f"{p:>11}" for p in phases) + f" {'host total':>11} {'all':>9}")
    for bs in args.batch:
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        llm.generate(_prompts(bs, args.prompt_len, vocab, 1000 + bs), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        best = None
        for r in range(args.repeat):
            acc.clear()
            step_s.update(t=0.0, decode_steps=0)
            sync()
            t = time.perf_counter()
            res = llm.generate(_prompts(bs, args.prompt_len, vocab, bs + r), params)
            sync()
            wall = time.perf_counter() - t
            assert all(len(o.token_ids) == args.steps for o in res)
            n = step_s["decode_steps"]
            us = {k: 1e6 * v / n for k, v in acc.items()}
            row = {
                "schedule": us.get("schedule", 0.0),
                "prepare": us.get("run", 0.0) - us.get("forward", 0.0) - us.get("sample", 0.0),
                "forward": us.get("forward", 0.0),
                "sample": us.get("sample", 0.0),
                "postprocess": us.get("step", 0.0) - us.get("schedule", 0.0) - us.get("run", 0.0),
                # generate() outside step(), spread over the decode steps (prefill steps excluded above).
                "loop": 1e6 * (wall - step_s["t"]) / n,
            }
            row["host total"] = sum(v for k, v in row.items() if k != "forward")
            row["all"] = row["host total"] + row["forward"]
            if best is None or row["host total"] < best["host total"]:
                best = row
        out[bs] = best
        log(f"  {bs:>5} " + " ".join(f"{best[p]:>11.1f}" for p in phases) + f" {best['host total']:>11.1f} {best['all']:>9.1f}")
    RESULTS["host"] = out
    del llm
    gc.collect()
    return out


def profile(args) -> None:
    from eval.decode_profile import profile_decode

    path = shape_dir(args.shape) if args.shape else args.model
    label = args.shape or os.path.basename(os.path.normpath(args.model))
    RESULTS[f"profile:{label}"] = [profile_decode(path, bool(args.shape), bs, args.steps, args.prompt_len, args.top,
                                                  args.eager, log, **engine_options(args.engine)) for bs in args.batch]


# -- GGUF -> plain HF directory ---------------------------------------------------------------------------
def convert_gguf(args) -> None:
    """A GGUF-loaded transformers model is flagged quantized (no .to(dtype), no save_pretrained), so
    rebuild a plain LlamaForCausalLM from its config and copy the dequantized weights over."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    d, f = os.path.split(os.path.abspath(args.gguf))
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = src.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    dst = LlamaForCausalLM(config)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m or (m == "lm_head.weight" and config.tie_word_embeddings) for m in missing), (missing, unexpected)
    dst.to(torch.bfloat16).save_pretrained(args.out)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(args.out)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(args.out)
    except Exception:  # noqa: BLE001 - generation_config is optional
        pass
    log(f"converted {args.gguf} -> {args.out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.engine_bench")
    ap.add_argument("--json", help="also write all results to this file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ceilings")
    d = sub.add_parser("decode")
    d.add_argument("--model")
    d.add_argument("--shape", choices=sorted(SHAPES))
    d.add_argument("--batch", type=int, nargs="+", default=[1])
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--hf", action="store_true", help="measure transformers generate with a static cache first")
    d.add_argument("--hf-compile", action="store_true", help="let transformers torch.compile its static-cache decode")
    d.add_argument("--roofline", action="store_true")
    d.add_argument("--engine", nargs="*", metavar="KEY=VALUE", help="EngineConfig overrides, e.g. num_decode_steps=1")
    t = sub.add_parser("throughput")
    t.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    t.add_argument("--max-num-seqs", type=int, default=256)
    t.add_argument("--max-num-batched-tokens", type=int, default=8192)
    t.add_argument("--prefill-attention", default="triton", choices=["sdpa", "triton"])
    t.add_argument("--profile-steps", default=None, metavar="FIRST:LAST",
                   help="trace engine steps FIRST..LAST-1 with torch.profiler: GPU busy fraction there")
    c = sub.add_parser("capacity")
    c.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    c.add_argument("--kv-tokens", type=int, help="pool size in tokens (default: what the engine sizes on this GPU)")
    a = sub.add_parser("agreement")
    a.add_argument("--model", required=True)
    a.add_argument("--new-tokens", type=int, default=64)
    h = sub.add_parser("host", help="host time per decode step, by phase (CPU, tiny model)")
    h.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    h.add_argument("--steps", type=int, default=512)
    h.add_argument("--prompt-len", type=int, default=16)
    h.add_argument("--vocab", type=int, default=512, help="small: the LM head and argmax stay negligible")
    h.add_argument("--repeat", type=int, default=3)
    h.add_argument("--device", default="cpu")
    h.add_argument("--forward", default="stub", choices=["stub", "real"],
                   help="stub: the model returns fixed hidden states and logits (the default); real: the tiny model runs")
    pr = sub.add_parser("profile", help="decode step time: whole step, graph replay alone, kernels by name")
    pr.add_argument("--model")
    pr.add_argument("--shape", choices=sorted(SHAPES))
    pr.add_argument("--batch", type=int, nargs="+", default=[1])
    pr.add_argument("--steps", type=int, default=256)
    pr.add_argument("--prompt-len", type=int, default=16)
    pr.add_argument("--top", type=int, default=25)
    pr.add_argument("--eager", action="store_true", help="no CUDA graphs")
    pr.add_argument("--engine", nargs="*", metavar="KEY=VALUE", help="EngineConfig overrides, e.g. fused_decode=false")
    g = sub.add_parser("convert-gguf")
    g.add_argument("--gguf", required=True)
    g.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd in ("decode", "profile") and not (args.model or args.shape):
        ap.error(f"{args.cmd} needs --model or --shape")
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} torch {torch.__version__} "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}: {' '.join(sys.argv)}")
    {"ceilings": lambda: ceilings(), "decode": lambda: decode(args), "throughput": lambda: throughput(args),
     "capacity": lambda: capacity(args), "agreement": lambda: agreement(args),
     "convert-gguf": lambda: convert_gguf(args), "host": lambda: host_overhead(args),
     "profile": lambda: profile(args)}[args.cmd]()
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({args.cmd: RESULTS}, default=str) + "\n")


if __name__ == "__main__":
    main()
