"""A small in-process load generator over `engine.AsyncLLM`: `requests` streamed requests, at most
`concurrency` in flight, none started after `time_limit_s`. Time to first token (TTFT) and
inter-token latency (ITL) are measured per request from the stream; a delta carrying several
tokens (a multi-step or speculative step) spreads its gap evenly over them. The KV blocks in use
are sampled at every delta, so the peak is what the load really held."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from eval.bench.common import prompts


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _client(llm: Any, prompt: list[int], max_tokens: int, record: dict[str, Any]) -> None:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    bm = llm.engine.block_manager
    start = last = time.perf_counter()
    ttft, gaps, tokens = None, [], 0
    async for delta in llm.generate(prompt, params):
        now = time.perf_counter()
        record["peak_blocks"] = max(record["peak_blocks"], bm.num_blocks - bm.num_free_blocks)
        n = len(delta.token_ids)
        if n:
            if ttft is None:
                ttft = now - start
                gaps.extend([(now - last) / n] * (n - 1))  # the first delta's extra tokens
            else:
                gaps.extend([(now - last) / n] * n)
            tokens += n
            last = now
    record["ttft"].append(ttft)
    record["itl"].extend(gaps)
    record["tokens"] += tokens


async def _load(llm: Any, requests: int, concurrency: int, prompt_len: int, max_tokens: int,
                time_limit_s: float) -> dict[str, Any]:
    vocab = llm.engine.vocab_size
    record: dict[str, Any] = {"ttft": [], "itl": [], "tokens": 0, "peak_blocks": 0}
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    skipped = 0

    async def one(i: int) -> None:
        nonlocal skipped
        async with gate:
            if time.perf_counter() - started > time_limit_s:
                skipped += 1
                return
            await _client(llm, prompts(1, prompt_len, vocab, 5000 + i)[0], max_tokens, record)

    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - started
    await llm.shutdown()
    return {"requests": requests - skipped, "skipped_by_time_limit": skipped, "concurrency": concurrency,
            "prompt_len": prompt_len, "max_tokens": max_tokens, "wall_s": wall,
            "output_tok_s": record["tokens"] / wall if wall > 0 else None,
            "ttft_p50_ms": _ms(percentile(record["ttft"], 50)), "ttft_p99_ms": _ms(percentile(record["ttft"], 99)),
            "itl_p50_ms": _ms(percentile(record["itl"], 50)), "itl_p99_ms": _ms(percentile(record["itl"], 99)),
            "peak_kv_blocks": record["peak_blocks"], "kv_block_size": llm.engine.config.block_size}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def load_test(llm: Any, requests: int, concurrency: int, prompt_len: int, max_tokens: int,
              time_limit_s: float) -> dict[str, Any]:
    """Run the load against an AsyncLLM (from synchronous code) and return its latency record."""
    return asyncio.run(_load(llm, requests, concurrency, prompt_len, max_tokens, time_limit_s))
