"""What CommonsenseQA multiple-choice scoring costs against a plain prefill of the same tokens.

Scores the first N questions' (context, choice) pairs with eval.multiple_choice.engine_loglikelihoods
(prompt logprobs, two waves) and runs the same prompts in the same two waves as plain greedy
generate(max_tokens=1) (no prompt logprobs), each from a cold prefix cache, in one process on one
engine. Prints JSON: seconds, engine steps, prompt and prefix-cached tokens of each, and their ratio.

    python experiments/mc_scoring_cost.py --model RUN/teacher --device cuda --dtype bfloat16 --questions 500
    python experiments/mc_scoring_cost.py --device cpu --questions 10 --profile   # cProfile to stderr
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from engine import LLM, SamplingParams
from eval.multiple_choice import TARGET_DELIMITER, cqa_questions, encode_pair, engine_loglikelihoods


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(llm: LLM, device: str, run: Callable[[], Any], profile: bool, label: str) -> dict[str, Any]:
    """Seconds, engine steps and token counts of ``run`` from a cold prefix cache."""
    engine = llm.engine
    engine.block_manager.reset_prefix_cache()
    counts = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generate_calls": 0}
    generate = llm.generate

    def counting(prompts, params):
        outs = generate(prompts, params)
        counts["generate_calls"] += 1
        counts["requests"] += len(outs)
        counts["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in outs)
        counts["cached_tokens"] += sum(o.num_cached_tokens for o in outs)
        return outs

    llm.generate = counting
    steps = engine.num_steps
    prof = cProfile.Profile() if profile else None
    try:
        _sync(device)
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        run()
        _sync(device)
        seconds = time.perf_counter() - t
    finally:
        if prof is not None:
            prof.disable()
        del llm.generate  # the bound method again
    if prof is not None:
        print(f"--- {label}: cProfile, by own time", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return {"seconds": round(seconds, 3), "steps": engine.num_steps - steps, **counts}


def host_scan_us(vocab: int, tokens: int = 600) -> float:
    """Microseconds per prompt token of the pre-fix host path (a CPU copy of the chunk's log_softmax,
    then per token a read of its logprob and a scan of the vocabulary for its rank): on a host whose
    torch threads outnumber the cores it may use, each scan is an OpenMP region that can take
    milliseconds (a 2-core box, 2 threads: 23 ms against 28 us with 1)."""
    lp = torch.log_softmax(torch.randn(60, vocab), dim=-1)
    t = time.perf_counter()
    for j in range(tokens):
        row = lp[j % 60]
        chosen = float(row[j % vocab])
        int((row > chosen).sum())
    return 1e6 * (time.perf_counter() - t) / tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2 teacher)")
    ap.add_argument("--data", default=os.environ.get("SHRINK_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="eval=gpu's: the largest batch it measures")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2, help="each measured this many times; the last is kept")
    ap.add_argument("--profile", action="store_true", help="cProfile the last repeat of each (to stderr)")
    args = ap.parse_args()
    model = args.model or str(next((Path.home() / ".cache/shrink/converted").glob("*/config.json")).parent)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    llm = LLM(model, device=args.device, dtype=dtype, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len)
    questions = cqa_questions(Path(args.data), "test", args.questions)
    pairs = [encode_pair(llm.tokenizer, q.context, TARGET_DELIMITER + c) for q in questions for c in q.choices]
    score = engine_loglikelihoods(llm)

    def plain() -> None:
        """The prompts of score(pairs), in its two waves, as plain greedy prefills of one token."""
        params = SamplingParams(temperature=0.0, max_tokens=1)
        seen: set[tuple[int, ...]] = set()
        first = [i for i, (ctx, _) in enumerate(pairs) if not (tuple(ctx) in seen or seen.add(tuple(ctx)))]
        rest = sorted(set(range(len(pairs))) - set(first))
        for wave in (first, rest):
            llm.generate([pairs[i][0] + pairs[i][1] for i in wave], [params] * len(wave))

    result: dict[str, Any] = {"model": model, "device": args.device, "dtype": dtype, "questions": len(questions),
                              "pairs": len(pairs), "max_num_seqs": args.max_num_seqs,
                              "torch_threads": torch.get_num_threads(), "cpus_usable": len(os.sched_getaffinity(0)),
                              "old_host_scan_us_per_token": round(host_scan_us(llm.engine.vocab_size), 1)}
    for repeat in range(args.repeats):
        last = repeat == args.repeats - 1
        result["plain_prefill"] = _measure(llm, args.device, plain, args.profile and last, "plain prefill")
        result["prompt_logprobs"] = _measure(llm, args.device, lambda: score(pairs), args.profile and last,
                                             "prompt-logprob scoring")
    result["ratio"] = round(result["prompt_logprobs"]["seconds"] / result["plain_prefill"]["seconds"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
