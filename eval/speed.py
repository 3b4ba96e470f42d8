"""Prefill and decode speed through the engine at several batch sizes, and transformers'
`generate` on the same prompts in the same run as the baseline.

Each measurement times a run that generates one token (the prefill) and a run that generates
`new_tokens`, on fresh random prompts each (no prefix-cache hits), the fastest of REPEATS runs of
each (noise only ever adds time: on a busy machine a single run's noise swallowed the decode of a
few tokens): prefill tok/s is prompt tokens over the first; decode tok/s is the tokens after the
first over the difference."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CompileConfig

from eval.bench.common import prompts, timed

REPEATS = 3


def fastest(run: Any, seeds: list[int]) -> tuple[Any, float]:
    """(the output, the seconds) of the fastest of run(seed) over the seeds."""
    results = [timed(lambda seed=seed: run(seed)) for seed in seeds]
    return min(results, key=lambda r: r[1])


def _rates(batch: int, prompt_len: int, new_tokens: int, prefill_s: float, full_s: float) -> dict[str, Any]:
    decode_s = full_s - prefill_s
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tok_s": batch * prompt_len / prefill_s,
            # None when timing noise swallowed the decode (too few new_tokens to measure)
            "decode_tok_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
            "prefill_s": prefill_s, "total_s": full_s}


def engine_speed(llm: Any, batch_sizes: list[int], prompt_len: int, new_tokens: int) -> list[dict[str, Any]]:
    from engine import SamplingParams

    vocab = llm.engine.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(prompts(1, prompt_len, vocab, 7), SamplingParams(max_tokens=2, **greedy))  # warm-up
    out = []
    for bs in batch_sizes:
        first, t1 = fastest(lambda seed: llm.generate(prompts(bs, prompt_len, vocab, seed),
                                                     SamplingParams(max_tokens=1, **greedy)),
                            [1000 + bs + 100 * r for r in range(REPEATS)])
        full, tn = fastest(lambda seed: llm.generate(prompts(bs, prompt_len, vocab, seed),
                                                    SamplingParams(max_tokens=new_tokens, **greedy)),
                           [2000 + bs + 100 * r for r in range(REPEATS)])
        if any(o.error for o in first + full) or any(len(o.token_ids) != new_tokens for o in full):
            bad = next((o.error for o in first + full if o.error), "fewer tokens than asked")
            raise RuntimeError(f"engine speed run at batch {bs} failed: {bad}")
        out.append(_rates(bs, prompt_len, new_tokens, t1, tn))
    return out


def _compile_everywhere() -> CompileConfig:
    """transformers' default CompileConfig, with the flag its own tests set to compile on a CPU too
    (by itself generate compiles on CUDA only: hf_compile=all on a CPU would silently run eager)."""
    config = CompileConfig()
    config._compile_all_devices = True
    return config


def hf_compiles(setting: str, device_type: str, is_teacher: bool) -> bool:
    """Whether eval.speed.hf_compile asks this row's `generate` to run compiled (auto: the teacher's
    on CUDA, none on CPU, where torch.compile only adds minutes of compiling to the demo)."""
    if setting == "auto":
        setting = "teacher" if device_type == "cuda" else "none"
    return setting == "all" or (setting == "teacher" and is_teacher)


@torch.no_grad()
def hf_generate_speed(model: torch.nn.Module, batch_sizes: list[int], prompt_len: int,
                      new_tokens: int, compile: bool = False) -> list[dict[str, Any]]:
    """transformers generate, greedy, exactly new_tokens per sequence; a static cache where the
    model takes one (recorded as `cache`), else the default dynamic cache. With ``compile`` (and a
    static cache) generate runs its decode step torch.compile'd, as transformers does by default on
    a static cache: the project's standard baseline; without it, eager (`disable_compile`). A
    compile that fails raises: the baseline is then missing, never silently eager."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    out = []
    for bs in batch_sizes:
        def run(n: int, seed: int, cache: str | None, compiled: bool) -> None:
            ids = torch.tensor(prompts(bs, prompt_len, vocab, seed), device=device)
            extra: dict[str, Any] = {"cache_implementation": cache, "disable_compile": not compiled} if cache else {}
            if compiled:
                extra["compile_config"] = _compile_everywhere()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **extra)

        cache: str | None = "static"
        try:
            run(2, 7, cache, False)  # warm-up, and the probe for a static cache (eager: a compile error is no answer)
        except Exception:  # this model's cache class does not take a static cache
            cache = None
            run(2, 7, cache, False)
        compiled = compile and cache is not None
        if compiled:  # compile (and capture) for the timed cache shape before timing it
            for seed in (8, 9):
                run(new_tokens, seed, cache, compiled)
        _, t1 = fastest(lambda seed: run(1, seed, cache, compiled), [1000 + bs + 100 * r for r in range(REPEATS)])
        _, tn = fastest(lambda seed: run(new_tokens, seed, cache, compiled),
                        [2000 + bs + 100 * r for r in range(REPEATS)])
        out.append({**_rates(bs, prompt_len, new_tokens, t1, tn), "cache": cache or "dynamic", "compiled": compiled})
    if compile:
        torch._dynamo.reset()  # drop the compiled graphs before the engine runs in this process
    return out
