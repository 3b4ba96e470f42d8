"""Host time per decode step, by phase, on a tiny model (CPU by default); with ``--spec K``, per
speculative round (n-gram drafter) instead."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Any, Callable

import torch

from eval.bench.common import RESULTS, log, prompts


HOST_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5)
# The speculative stub's tokens walk a cycle of CYCLE tokens from CYCLE_START, one step forward but
# two at every SKIP_EVERY-th position: the n-gram drafter finds a match every round and is right
# about most of its tokens but not all, so rounds both accept and roll back.
CYCLE_START, CYCLE, SKIP_EVERY = 10, 9, 7
# --clock cpu: this thread's CPU time, which other processes on a shared machine barely disturb.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class PhaseTimer:
    """Seconds per phase of the decode steps, by wrapping methods on the instances (the engine
    carries no instrumentation). A step counts when the scheduler made it a decode step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.acc: dict[str, float] = {}
        self.decode = False
        self.steps = 0  # decode steps timed
        self.step_s = 0.0  # all steps, prefill included

    def reset(self) -> None:
        self.acc.clear()
        self.steps, self.step_s = 0, 0.0

    def wrap(self, obj: Any, name: str, key: str, on_result: Callable[[Any], None] | None = None) -> None:
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t = self.clock()
            out = inner(*a, **kw)
            dt = self.clock() - t
            if on_result is not None:
                on_result(out)
            if self.decode:
                self.acc[key] = self.acc.get(key, 0.0) + dt
            return out

        setattr(obj, name, wrapper)

    def wrap_engine(self, eng) -> None:
        """Engine.step (whole steps) and Scheduler.schedule (which also says the step's kind)."""
        def note_kind(batch) -> None:
            self.decode = batch is not None and not batch.is_prefill

        self.wrap(eng.scheduler, "schedule", "schedule", note_kind)
        inner_step = eng.step

        def step():
            t = self.clock()
            out = inner_step()
            dt = self.clock() - t
            self.step_s += dt
            if self.decode:
                self.acc["step"] = self.acc.get("step", 0.0) + dt
                self.steps += 1
            self.decode = False
            return out

        eng.step = step

    def us(self, key: str) -> float:
        return 1e6 * self.acc.get(key, 0.0) / self.steps


def _tiny_model(vocab: int) -> str:
    from transformers import LlamaConfig

    path = os.path.join(tempfile.gettempdir(), f"shape-host-v{vocab}")
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**HOST_SHAPE, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


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
    advance = a multi-step decode's greedy advance between its forwards (DecodeInputs.advance): on the
    CPU the plain-torch reference (kernels/greedy_advance.py), device work that a GPU runs inside its
    graph, so like forward it is left out of "host total" (it was part of "prepare" before).
    """
    if args.spec:
        return spec_round_overhead(args)
    from engine import LLM, SamplingParams

    path = _tiny_model(args.vocab)
    torch.set_num_threads(1)
    max_bs = max(args.batch)
    llm = LLM(path, load_format="dummy", device=args.device, max_num_seqs=max_bs, cuda_graph_max_bs=max_bs,
              max_model_len=args.prompt_len + args.steps + 16, enable_prefix_caching=False)
    eng, runner = llm.engine, llm.engine.runner
    phases = ("schedule", "prepare", "forward", "advance", "sample", "postprocess", "loop")
    timer = PhaseTimer(CLOCKS[args.clock])
    if args.forward == "stub":
        # The forward reduced to returning fixed tensors (what a CUDA-graph replay costs the host is
        # a few us): the CPU's eager forward of even this model takes ~1.5 ms, evicts the caches
        # and churns the allocator, which inflates and blurs the host phases around it.
        hidden = torch.zeros(eng.config.max_num_batched_tokens, HOST_SHAPE["hidden_size"], dtype=runner.dtype,
                             device=runner.device)
        logits = torch.randn(max_bs, args.vocab, generator=torch.Generator().manual_seed(0)).to(runner.device, runner.dtype)
        runner.model.forward = lambda ids, positions: hidden[: ids.shape[0]]
        runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    timer.wrap_engine(eng)
    timer.wrap(runner, "run", "run")
    timer.wrap(runner.model, "forward", "forward")
    timer.wrap(runner.model, "compute_logits", "forward")
    timer.wrap(runner.sampler, "sample_step", "sample")
    timer.wrap(runner.decode_inputs, "fetch_tokens", "sample")
    timer.wrap(runner.decode_inputs, "advance", "advance")
    for graph in runner.graphs.graphs.values() if runner.graphs else []:  # CUDA: the replay's launch is the forward's host cost
        timer.wrap(graph, "replay", "forward")
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
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
            timer.reset()
            sync()
            t = timer.clock()
            res = llm.generate(prompts(bs, args.prompt_len, vocab, bs + r), params)
            sync()
            wall = timer.clock() - t
            assert all(len(o.token_ids) == args.steps for o in res)
            row = {
                "schedule": timer.us("schedule"),
                "prepare": timer.us("run") - timer.us("forward") - timer.us("advance") - timer.us("sample"),
                "forward": timer.us("forward"),
                "advance": timer.us("advance"),
                "sample": timer.us("sample"),
                "postprocess": timer.us("step") - timer.us("schedule") - timer.us("run"),
                # generate() outside step(), spread over the decode steps (prefill steps excluded above).
                "loop": 1e6 * (wall - timer.step_s) / timer.steps,
            }
            row["host total"] = sum(v for k, v in row.items() if k not in ("forward", "advance"))
            row["all"] = row["host total"] + row["forward"] + row["advance"]
            if best is None or row["host total"] < best["host total"]:
                best = row
        out[bs] = best
        log(f"  {bs:>5} " + " ".join(f"{best[p]:>11.1f}" for p in phases) + f" {best['host total']:>11.1f} {best['all']:>9.1f}")
    RESULTS["host"] = out
    del llm
    gc.collect()
    return out


def _cycle_stub(runner, vocab: int, max_tokens: int) -> None:
    """The model reduced to a fixed next-token rule (module comment): the forward writes each row's
    next token into its hidden state, compute_logits turns that into one-hot logits, so any row
    selection between the two (last tokens, verify rows) keeps working."""
    hidden = torch.zeros(max_tokens, HOST_SHAPE["hidden_size"], dtype=torch.float32, device=runner.device)
    table = torch.full((vocab, vocab), -10.0, device=runner.device)
    table[torch.arange(vocab), torch.arange(vocab)] = 10.0

    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        offset = (ids - CYCLE_START).clamp(min=-1)  # -1: a prompt token, enter the cycle at its start
        step = 1 + (positions % SKIP_EVERY == 0).to(ids.dtype)
        nxt = torch.where(offset < 0, CYCLE_START, CYCLE_START + (offset + step) % CYCLE)
        h = hidden[: ids.shape[0]]
        h[:, 0] = nxt
        return h

    runner.model.forward = forward
    runner.model.compute_logits = lambda h: table[h[:, 0].long()]


def spec_round_overhead(args) -> dict:
    """Microseconds of host work per speculative round (n-gram drafter, k = --spec) with the forward
    stubbed by a next-token rule the drafter mostly predicts (_cycle_stub), on the CPU. Phases:
    schedule; draft = the proposer; forward = the stub (the verify's, and a plain step's where the
    n-gram found nothing); verify = the rest of SpecDecodeWorker.step (verify inputs, rejection,
    the tokens' transfer); postprocess = the rest of LLMEngine.step (appending the accepted tokens,
    stop checks, rolling back the rejected tail's blocks); loop = LLM.generate outside step().
    Also tokens per round and the acceptance rate, so that runs are comparable."""
    from engine import LLM, SamplingParams

    path = _tiny_model(args.vocab)
    torch.set_num_threads(1)
    max_bs = max(args.batch)
    spec = {"method": "ngram", "num_speculative_tokens": args.spec, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
            "max_batch_size": max_bs}
    llm = LLM(path, load_format="dummy", device=args.device, max_num_seqs=max_bs, cuda_graph_max_bs=max_bs,
              max_model_len=args.prompt_len + args.steps + 16, enable_prefix_caching=False, speculative_config=spec)
    eng, runner, worker = llm.engine, llm.engine.runner, llm.engine.spec_worker
    _cycle_stub(runner, args.vocab, eng.config.max_num_batched_tokens)
    timer = PhaseTimer(CLOCKS[args.clock])
    timer.wrap_engine(eng)
    timer.wrap(worker, "step", "round")
    timer.wrap(worker.proposer, "propose", "draft")
    timer.wrap(runner.model, "forward", "forward")
    timer.wrap(runner.model, "compute_logits", "forward")
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    phases = ("schedule", "draft", "forward", "verify", "postprocess", "loop")
    out: dict[int, dict[str, float]] = {}
    log(f"host overhead per speculative round: device {runner.device}, n-gram k={args.spec}, forward stub, "
        f"{args.prompt_len}-token prompts, {args.steps} tokens, best of {args.repeat} (us per round)")
    log(f"  {'batch':>5} " + " ".join(f"{p:>11}" for p in phases)
        + f" {'host total':>11} {'tok/round':>9} {'accept':>7}")
    for bs in args.batch:
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        warm_up = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        llm.generate(prompts(bs, args.prompt_len, args.vocab, 1000 + bs), warm_up)
        best = None
        for r in range(args.repeat):
            timer.reset()
            metrics = worker.metrics
            drafted, accepted = metrics.num_proposed, metrics.num_accepted
            sync()
            t = timer.clock()
            res = llm.generate(prompts(bs, args.prompt_len, args.vocab, bs + r), params)
            sync()
            wall = timer.clock() - t
            assert all(len(o.token_ids) == args.steps for o in res)
            row = {
                "schedule": timer.us("schedule"),
                "draft": timer.us("draft"),
                "forward": timer.us("forward"),
                "verify": timer.us("round") - timer.us("draft") - timer.us("forward"),
                "postprocess": timer.us("step") - timer.us("schedule") - timer.us("round"),
                "loop": 1e6 * (wall - timer.step_s) / timer.steps,
            }
            row["host total"] = sum(v for k, v in row.items() if k != "forward")
            row["tokens per round"] = (bs * args.steps - bs) / timer.steps / bs  # the prefill gave each its first
            row["acceptance"] = (metrics.num_accepted - accepted) / max(1, metrics.num_proposed - drafted)
            if best is None or row["host total"] < best["host total"]:
                best = row
        out[bs] = best
        log(f"  {bs:>5} " + " ".join(f"{best[p]:>11.1f}" for p in phases)
            + f" {best['host total']:>11.1f} {best['tokens per round']:>9.2f} {best['acceptance']:>7.2f}")
    RESULTS["host_spec"] = out
    del llm
    gc.collect()
    return out
