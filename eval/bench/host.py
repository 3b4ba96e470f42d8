"""Host time per decode step, by phase, on a tiny model (CPU by default)."""

from __future__ import annotations

import gc
import os
import tempfile
import time

import torch

from eval.bench.common import RESULTS, log, prompts


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
        llm.generate(prompts(bs, args.prompt_len, vocab, 1000 + bs), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        best = None
        for r in range(args.repeat):
            acc.clear()
            step_s.update(t=0.0, decode_steps=0)
            sync()
            t = time.perf_counter()
            res = llm.generate(prompts(bs, args.prompt_len, vocab, bs + r), params)
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
