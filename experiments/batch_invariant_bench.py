"""What batch-invariant mode (EngineConfig.batch_invariant) costs, and whether it gives speculative
greedy output identical to plain greedy output, on a GPU.

    python experiments/batch_invariant_bench.py [--model DIR | --shape smollm2-135m] [--draft DIR]
        [--batch 1 4 8 16] [--k 4] [--context 512] [--new-tokens 256] [--json out.jsonl]

For each mode (off, on), one process, engines one after another (each freed before the next):
- ``forward``: device time of the decode forward of B rows (B sequences, one token each, CUDA graphs)
  and of a speculative verify of B sequences x (k + 1) tokens (the path the engine takes: in the
  mode pseudo-rows only; without it the path timed fastest at startup), after ``--context`` tokens,
  medians of --repeat; with their ratio; and the prefill of the B contexts (a draft's catch-up path:
  the varlen prefill or its graphs, in the mode decode pseudo-rows, as the mode's prefill runs).
- ``generate``: tok/s of LLM.generate at each batch size, plain greedy (spec_bench's median of
  --repeats after a warm-up).
- ``spec_equal``: plain greedy against speculative greedy (``--draft`` DIR; default: the target
  drafting for itself, every draft accepted) on --prompts random prompts x --new-tokens tokens, at
  batch --prompts: spec_bench.divergence_report (first divergent position per sequence, the plain
  run's top-1/top-2 logit margin there) and both runs' tok/s.

Random weights of --shape (load_format dummy) unless --model. One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_bench import _median_tok_s, divergence_report, emit, free_device_memory, greedy_with_margins  # noqa: E402


def engine_kwargs(args, invariant: bool, **extra: Any) -> dict:
    max_len = args.context + args.new_tokens + args.k + 64
    return {"load_format": "safetensors" if args.model else "dummy", "max_model_len": max_len,
            "max_num_seqs": max(max(args.batch), args.prompts), "batch_invariant": invariant,
            "kv_cache_tokens": (max(max(args.batch), args.prompts) + 1) * max_len,
            **(json.loads(args.engine) if args.engine else {}), **extra}


def _median_us(run, repeat: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for r in range(repeat + 1):
        sync()
        t = time.perf_counter()
        run()
        sync()
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def forward_costs(args, path: str, invariant: bool) -> None:
    """Decode forward of B rows and verify forward of B x (k + 1) tokens, B in --batch."""
    import torch

    from engine import LLM
    from eval.bench.common import prompts as random_prompts

    # An n-gram speculative config sizes the runner as a speculative engine's (verify rows, graphs);
    # speculation itself is never scheduled here: the forwards are called directly.
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "max_batch_size": max(args.batch)}
    llm = LLM(path, **engine_kwargs(args, invariant, speculative_config=spec))
    runner, vocab = llm.engine.runner, llm.engine.vocab_size
    paths, bs_blocks = runner.verify_paths, -(-(args.context + args.k + 1) // runner.block_size)
    with torch.inference_mode():
        for batch in args.batch:
            tables = [list(range(i * bs_blocks, (i + 1) * bs_blocks)) for i in range(batch)]
            prefix = random_prompts(batch, args.context, vocab, 0)
            contexts = [(p, 0, t) for p, t in zip(prefix, tables)]
            # The contexts' K/V, as a prefill computes them (the mode: decode pseudo-rows); timed after a warm-up.
            prefill_us = _median_us(lambda: paths.last_logits(contexts), min(args.repeat, 3))
            tail = random_prompts(batch, args.k + 1, vocab, 1)
            decode = [(t[:1], args.context, table) for t, table in zip(tail, tables)]
            verify = [(t, args.context, table) for t, table in zip(tail, tables)]
            decode_us = _median_us(lambda: paths.pseudo_row_logits(decode), args.repeat)
            verify_us = _median_us(lambda: paths.all_logits(verify), args.repeat)
            emit({"bench": "batch_invariant_forward", "batch_invariant": invariant, "batch": batch, "k": args.k,
                  "context": args.context, "prefill_us": prefill_us, "decode_forward_us": decode_us,
                  "verify_forward_us": verify_us,
                  "verify_path": paths.choose(verify), "verify_over_decode": verify_us / decode_us}, args.json)
    del llm, runner, paths
    free_device_memory()


def generate_speed(args, path: str, invariant: bool) -> None:
    from engine import LLM
    from eval.bench.common import prompts as random_prompts

    llm = LLM(path, **engine_kwargs(args, invariant))
    for batch in args.batch:
        batch_prompts = random_prompts(batch, args.context, llm.engine.vocab_size, 2)
        tok_s, runs, _, _ = _median_tok_s(llm, [batch_prompts], args.new_tokens, args.repeats)
        emit({"bench": "batch_invariant_generate", "batch_invariant": invariant, "batch": batch,
              "new_tokens": args.new_tokens, "tok_s": tok_s, "runs_tok_s": runs}, args.json)
    del llm
    free_device_memory()


def spec_equal(args, path: str, invariant: bool) -> None:
    from engine import LLM
    from eval.bench.common import prompts as random_prompts

    kwargs = engine_kwargs(args, invariant)
    llm = LLM(path, **kwargs)
    ps = random_prompts(args.prompts, args.context // 4, llm.engine.vocab_size, 3)
    t = time.perf_counter()
    plain, margins = greedy_with_margins(llm, ps, args.new_tokens)
    plain_s = time.perf_counter() - t
    del llm
    free_device_memory()
    spec_config = {"model": args.draft or path, "num_speculative_tokens": args.k}
    llm = LLM(path, **kwargs, speculative_config=spec_config)
    from engine import SamplingParams

    # warm-up; a run of no more than 8 tokens warms up on itself (the same shapes), not on a longer one
    llm.generate(ps, SamplingParams(temperature=0, max_tokens=min(8, args.new_tokens), ignore_eos=True))
    t = time.perf_counter()
    spec = [list(o.token_ids) for o in llm.generate(ps, SamplingParams(temperature=0, max_tokens=args.new_tokens,
                                                                           ignore_eos=True))]
    spec_s = time.perf_counter() - t
    m = llm.engine.spec_metrics
    emit({"bench": "batch_invariant_spec_equal", "batch_invariant": invariant, "prompts": args.prompts,
          "new_tokens": args.new_tokens, "k": args.k, "draft": args.draft or "target itself",
          **divergence_report(plain, margins, spec),
          "plain_with_logprobs_tok_s": args.prompts * args.new_tokens / plain_s,
          "spec_tok_s": args.prompts * args.new_tokens / spec_s, **(m.as_dict() if m is not None else {})}, args.json)
    del llm
    free_device_memory()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory (default: random weights of --shape)")
    ap.add_argument("--shape", default="smollm2-135m", help="eval.bench.common.SHAPES")
    ap.add_argument("--draft", help="draft model directory for spec_equal (default: the target itself)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20, help="timed forwards per figure (median)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per figure (median)")
    ap.add_argument("--engine", help='more EngineConfig settings as JSON, e.g. \'{"enforce_eager": true}\'')
    ap.add_argument("--only", nargs="+", default=["forward", "generate", "spec_equal"])
    ap.add_argument("--json", help="append every result line to this file")
    args = ap.parse_args(argv)
    from eval.bench.common import shape_dir

    path = args.model or shape_dir(args.shape)
    steps = {"forward": forward_costs, "generate": generate_speed, "spec_equal": spec_equal}
    for name in args.only:
        for invariant in (False, True):
            try:
                steps[name](args, path, invariant)
            except Exception as e:  # one failing part must not lose the others
                emit({"bench": f"batch_invariant_{name}", "batch_invariant": invariant,
                      "error": f"{type(e).__name__}: {e}"}, args.json)
                free_device_memory()


if __name__ == "__main__":
    main()
