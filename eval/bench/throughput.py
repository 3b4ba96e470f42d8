"""Throughput on nano-vllm's workload, with per-step accounting and roofs."""

from __future__ import annotations

import gc
import random
import time

import torch

from eval.bench.ceilings import ceilings
from eval.bench.common import RESULTS, log, shape_dir, timed, weight_bytes
from eval.bench.decode_profile import busy_fraction, kernel_events


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
