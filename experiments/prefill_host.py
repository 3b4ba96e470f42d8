"""Where a short prefill's host time goes: cProfile of generate(max_tokens=1) on a model shape.

    python experiments/prefill_host.py --shape smollm2-135m --prompt-len 16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from engine import LLM, SamplingParams
from eval.bench.common import prompts, shape_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    llm = LLM(shape_dir(args.shape), load_format="dummy", max_num_seqs=1, cuda_graph_max_bs=1,
              max_model_len=args.prompt_len + 64, enable_prefix_caching=False)
    vocab = llm.engine.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for seed in range(3):
        llm.generate(prompts(1, args.prompt_len, vocab, seed), one)
    torch.cuda.synchronize()
    times = []
    for seed in range(10):
        t = time.perf_counter()
        llm.generate(prompts(1, args.prompt_len, vocab, 100 + seed), one)
        times.append(1e3 * (time.perf_counter() - t))
    print(f"prefill-only generate, {args.prompt_len} tokens: " + " ".join(f"{t:.2f}" for t in times) + " ms")
    prof = cProfile.Profile()
    prof.enable()
    for seed in range(10):
        llm.generate(prompts(1, args.prompt_len, vocab, 200 + seed), one)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
