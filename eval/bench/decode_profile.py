"""Where a decode step's time goes: the whole step, the GPU work alone, and the kernels.

    python -m eval.bench profile --shape smollm2-135m --batch 1 [--steps 256] [--top 25]

Three figures per batch size, all from this process:
  step      wall time per token of `LLM.generate` (greedy, ignore EOS), prefill amortised;
  graph     the captured decode graph replayed back to back with one sync at the end: the GPU's
            own time per step, with no host work between steps (CUDA graphs only);
  step graph  the same for the multi-step graph (forward + greedy advance), each replay after a
            reset of the decode inputs (one host-to-device copy), so positions never run ahead;
  kernels   a torch.profiler trace of decode steps: kernel time per step by kernel name, and the
            GPU-busy fraction (union of kernel intervals / wall time of the traced window).
step - graph is what the host adds per token that the GPU does not hide.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import torch

from eval.bench.common import RESULTS, engine_options, log, prompts, shape_dir, timed


def kernel_events(prof) -> list[Any]:
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out.append(e)
    return out


def busy_fraction(intervals: list[tuple[float, float]], window: float) -> float:
    """Union length of [start, end) intervals over the window length."""
    if window <= 0:
        return 0.0
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / window


def kernel_table(events: list[Any], steps: int) -> list[dict]:
    """Per kernel name: launches per step, total us per step, mean us per launch; largest first."""
    agg: dict[str, list[float]] = defaultdict(list)
    for e in events:
        agg[e.name].append(e.time_range.elapsed_us())
    rows = [{"kernel": name, "per_step": len(d) / steps, "us_per_step": sum(d) / steps, "us_each": sum(d) / len(d)}
            for name, d in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


class StepTimer:
    """Wall time of every engine step of a run, by kind: prefill, decode (one token) or decode xK
    (a multi-step batch of K forwards). Each step ends with its tokens on the host (a sync), so
    the host clock is the step's time; what the steps leave of the run is generate()'s own loop."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.times: dict[str, list[float]] = defaultdict(list)

    def __enter__(self) -> "StepTimer":
        engine, schedule, step = self.engine, self.engine.scheduler.schedule, self.engine.step
        kind = [""]

        def scheduled():
            batch = schedule()
            if batch is not None:
                kind[0] = "prefill" if batch.is_prefill else (f"decode x{batch.num_steps}" if batch.num_steps > 1 else "decode")
            return batch

        def timed_step():
            t = time.perf_counter()
            out = step()
            self.times[kind[0]].append(time.perf_counter() - t)
            return out

        engine.scheduler.schedule, engine.step = scheduled, timed_step
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.scheduler.schedule, self.engine.step  # back to the class's methods

    def summary(self, total_s: float) -> dict[str, dict[str, float]]:
        out = {kind: {"count": len(t), "mean_us": 1e6 * sum(t) / len(t), "share": sum(t) / total_s}
               for kind, t in sorted(self.times.items())}
        rest = total_s - sum(sum(t) for t in self.times.values())
        out["outside steps"] = {"count": 1, "mean_us": 1e6 * rest, "share": rest / total_s}
        return out


def profile_decode(path: str, dummy: bool, batch: int, steps: int, prompt_len: int, top: int, eager: bool,
                   log=print, **engine: Any) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    llm = LLM(path, load_format="dummy" if dummy else "safetensors", max_num_seqs=batch, cuda_graph_max_bs=batch,
              max_model_len=prompt_len + steps + 16, enable_prefix_caching=False, enforce_eager=eager, **engine)
    runner = llm.engine.runner
    vocab = llm.engine.vocab_size
    on_cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    greedy = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    llm.generate(prompts(batch, prompt_len, vocab, 7), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with StepTimer(llm.engine) as steps_timed:
        _, seconds = timed(lambda: llm.generate(prompts(batch, prompt_len, vocab, 8), greedy))
    step_us = 1e6 * seconds / steps
    res: dict[str, Any] = {"batch": batch, "step_us": step_us, "tok_s": batch * 1e6 / step_us,
                           "engine_steps": steps_timed.summary(seconds)}
    graphs = runner.graphs
    if graphs is not None:
        graph = graphs.graphs[graphs.bucket_of[batch]]
        reps = 200
        graph.replay()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        sync()
        res["graph_us"] = 1e6 * (time.perf_counter() - t) / reps
        step_graph = graphs.step_graphs.get(graphs.bucket_of[batch])
        if step_graph is not None:
            d_buf = runner.decode_inputs.buf.device_buf
            saved = d_buf.clone()  # the last prepared decode inputs
            t = time.perf_counter()
            for _ in range(reps):
                d_buf.copy_(saved, non_blocking=True)
                step_graph.replay()
            sync()
            res["step_graph_us"] = 1e6 * (time.perf_counter() - t) / reps
    traced = min(steps, 64)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts(batch, prompt_len, vocab, 9), SamplingParams(temperature=0, max_tokens=traced, ignore_eos=True))
        sync()
        window_us = 1e6 * (time.perf_counter() - t0)
    kernels = kernel_events(prof)
    table = kernel_table(kernels, traced)
    res["kernel_us_per_step"] = sum(r["us_per_step"] for r in table)
    res["launches_per_step"] = sum(r["per_step"] for r in table)
    res["gpu_busy"] = busy_fraction([(e.time_range.start, e.time_range.end) for e in kernels], window_us)
    res["kernels"] = table[:top]
    mode = ("CUDA graphs" if runner.graphs else "eager") + "".join(f", {k}={v}" for k, v in engine.items())
    log(f"profile batch {batch} ({mode}): step {step_us:.1f} us per decode step "
        f"({res['tok_s']:.0f} tok/s)" + (f", graph replay alone {res['graph_us']:.1f} us" if "graph_us" in res else "")
        + f", kernels {res['kernel_us_per_step']:.1f} us in {res['launches_per_step']:.0f} launches per step, "
        f"GPU busy {100 * res['gpu_busy']:.1f}% of the traced window (prefill of {traced}-token run included)")
    log("    engine steps: " + ", ".join(f"{kind} {v['count']}x {v['mean_us']:.0f} us ({v['share']:.0%})"
                                        for kind, v in res["engine_steps"].items()))
    for r in table[:top]:
        log(f"    {r['us_per_step']:8.1f} us/step {r['per_step']:6.1f}x {r['us_each']:7.2f} us  {r['kernel'][:110]}")
    del llm
    return res


def profile(args, variant_options: dict | None = None) -> None:
    """The profile subcommand. ``args.variant``: the shape's random weights compressed as eval/bench/quant.py's
    decode rows (cli.py opens that context around this call, and passes the variant's engine options)."""
    path = shape_dir(args.shape) if args.shape else args.model
    label = (args.shape or os.path.basename(os.path.normpath(args.model))) + \
        ("" if args.variant == "bf16" else f":{args.variant}")
    options = {**(variant_options or {}), **engine_options(args.engine)}
    RESULTS[f"profile:{label}"] = [profile_decode(path, bool(args.shape), bs, args.steps, args.prompt_len,
                                                  args.top, args.eager, log, **options) for bs in args.batch]
