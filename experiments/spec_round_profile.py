"""Issue 14: where a speculative round's time goes on a launch-bound target.

The fourteenth session's lease (BENCHMARKS.md) timed a speculative round on SmolLM2-135M at batch 1 at
~1.6 ms against ~0.5 ms for a plain step, whatever the drafter (n-gram at 4.6 tokens a round made 1.50x;
Medusa heads at 1.2-1.4 tokens a round 0.36-0.56x). The plain engine runs `num_decode_steps` greedy steps
per host round trip; a round needs the host between the verify and the next draft. Is the round's time the
GPU's (the verify forward of k + 1 rows) or the host's (scheduling, inputs, copies, the sync, bookkeeping)?

For each variant (plain, plain with num_decode_steps=1, speculative with --method at k = --k) this runs the
same greedy requests three times: a warm-up, a timed run, and a run under torch.profiler (CPU + CUDA), and
prints one JSON line: wall and tokens of the timed run, engine steps, and from the profiled run the GPU's
busy time (the union of its kernel and copy intervals in the trace) against the wall, per step. It writes
each profile's Chrome trace (gzip) and its op tables (top by self CUDA time, by self CPU time) under --out,
and a cProfile of a fourth run's Python functions by cumulative time (the host's share by function).

    python experiments/spec_round_profile.py --target SMOL.gguf|HF_DIR --data-dir ../shared/data --out DIR \
        [--batch 1] [--k 4] [--method ngram|medusa --heads DIR] [--num-rounds R] [--new-tokens 128] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_bench import emit, free_device_memory, load_prompts  # noqa: E402


def busy_seconds(trace: dict) -> tuple[float, float, int]:
    """(GPU busy s: the union of kernel and memcpy/memset intervals, the trace window's span s, kernels)."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in trace.get("traceEvents", [])
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    kernels = sum(1 for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel")
    busy, end = 0.0, None
    for s, e in spans:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    window = (spans[-1][1] - spans[0][0]) if spans else 0.0
    return busy / 1e6, window / 1e6, kernels


def run_variant(args, name: str, engine_kwargs: dict, prompts: list[list[int]], out: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    llm = LLM(args.target, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]

    cuda = llm.engine.config.torch_device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def generate() -> tuple[float, int, int]:
        steps0 = llm.engine.num_steps
        sync()
        start = time.perf_counter()
        outs = llm.generate(requests, params)
        sync()
        return time.perf_counter() - start, sum(len(o.token_ids) for o in outs), llm.engine.num_steps - steps0

    generate()  # warm-up
    wall, tokens, steps = generate()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        p_wall, _, p_steps = generate()
    trace_path = out / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    with gzip.open(str(trace_path) + ".gz", "wt") as f:
        json.dump(trace, f)
    trace_path.unlink()
    busy, window, kernels = busy_seconds(trace)
    tables = out / f"{name}.ops.txt"
    tables.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    pr = cProfile.Profile()
    pr.enable()
    generate()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
    (out / f"{name}.cprofile.txt").write_text(s.getvalue())
    worker = llm.engine.spec_worker
    row = {"bench": "spec_round_profile", "variant": name, "engine": engine_kwargs, "batch": len(prompts),
           "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "steps": steps,
           "ms_per_step": wall / steps * 1e3 if steps else None, "tokens_per_step": tokens / steps if steps else None,
           "profiled_wall_s": p_wall, "gpu_busy_s": busy, "gpu_window_s": window, "kernels": kernels,
           "gpu_busy_of_wall": busy / p_wall if p_wall else None,
           "gpu_busy_ms_per_step": busy / p_steps * 1e3 if p_steps else None,
           "spec_metrics": worker.metrics.as_dict() if worker is not None else None}
    del llm, worker, prof
    free_device_memory()
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="a .gguf file or a model directory")
    p.add_argument("--data-dir", required=True, help="shared data (wikitext-2-raw/ for the prompts)")
    p.add_argument("--out", required=True, help="traces, op tables and cProfiles (created)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--method", default="ngram", choices=["ngram", "medusa"])
    p.add_argument("--heads", help="--method medusa: the heads' directory")
    p.add_argument("--num-rounds", type=int, default=1,
                   help="the spec variant's speculative_config num_rounds (device-resident rounds: rounds.py)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--engine", default='{"max_model_len": 2048}', help="EngineConfig overrides as JSON")
    p.add_argument("--variants", default="plain,plain_1step,spec",
                   help="comma-separated, of plain, plain_1step, spec (each a fresh engine)")
    p.add_argument("--json", help="append the result lines to this file")
    args = p.parse_args(argv)
    if args.method == "medusa" and not args.heads:
        p.error("--method medusa needs --heads")
    engine = json.loads(args.engine)
    spec = {"method": args.method, "num_speculative_tokens": args.k}
    if args.method == "medusa":
        spec["model"] = args.heads
    if args.num_rounds > 1:
        spec["num_rounds"] = args.num_rounds
    variants = {"plain": ("plain", engine), "plain_1step": ("plain_1step", {**engine, "num_decode_steps": 1}),
                "spec": (f"{args.method}_k{args.k}" + (f"_r{args.num_rounds}" if args.num_rounds > 1 else ""),
                         {**engine, "speculative_config": spec})}
    wanted = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in wanted if v not in variants]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {sorted(variants)}")
    from engine.config import EngineConfig
    from engine.tokenizer import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(EngineConfig(model=args.target, **engine).model)
    prompts = load_prompts("wikitext", Path(args.data_dir), tokenizer, args.batch, args.prompt_tokens)
    for name, kwargs in (variants[v] for v in wanted):
        try:
            row = run_variant(args, name, kwargs, prompts, out)
        except Exception as e:  # one variant failing must not lose the others
            row = {"bench": "spec_round_profile", "variant": name, "error": f"{type(e).__name__}: {e}"}
        emit(row, args.json)


if __name__ == "__main__":
    main()
