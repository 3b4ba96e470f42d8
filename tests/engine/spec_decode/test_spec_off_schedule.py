"""A speculative engine with drafting off does the plain engine's work: for the same long-prompt
requests, run as spec_bench's speed rows run them (a short warm-up, then the same batch again, so
the prompts come from the prefix cache), both schedule the same prefill chunks and decode steps
(multi-step ones included) and produce the same tokens. The twelfth H200 lease measured the plain
engine 1.6x slower than a speculative engine doing plain steps on wikitext; this pins that the two
do not differ in the work they schedule, wherever such a difference would come from (the KV pool's
size, prefix caching, chunked prefill, the multi-step decode, the speculative scheduler's paths)."""

from __future__ import annotations

import pytest
from drafts import perturbed_copy

from engine.llm import LLM
from engine.sampling_params import SamplingParams

TARGET = "llama_gqa_untied"
PROMPT_TOKENS = 200  # long: many full blocks for the prefix cache, several prefill chunks below
NEW_TOKENS = 40
K = 3


@pytest.fixture(scope="module")
def target(model_dir) -> str:
    return model_dir(TARGET, with_tokenizer=True)


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory) -> str:
    return perturbed_copy(target, str(tmp_path_factory.mktemp("off") / "draft"), 0.008)


def _long_prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + 13 * j) % 250 for j in range(PROMPT_TOKENS - 9 * i)] for i in range(n)]


def _traced_runs(llm: LLM, batch: list[list[int]]) -> tuple[list[tuple], list[list[int]], list[int], tuple]:
    """The steps scheduled (kind, rows, tokens per row, forwards per step) by a warm-up and two
    full runs of ``batch``, the last run's tokens and prefix-cache hits, and the engine's counters."""
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule
    steps: list[tuple] = []

    def traced():
        batch_ = schedule()
        if batch_ is not None:
            kind = "prefill" if batch_.is_prefill else "spec" if batch_.num_draft is not None else "decode"
            steps.append((kind, len(batch_.seqs), tuple(batch_.num_scheduled), batch_.num_steps))
        return batch_

    scheduler.schedule = traced
    llm.generate(batch, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(2):
        outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    engine = llm.engine
    return (steps, [o.token_ids for o in outs], [o.num_cached_tokens for o in outs],
            (engine.num_steps, engine.num_multi_steps, engine.num_spec_steps))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_drafting_off_schedules_the_plain_engines_steps(target, draft, batch_size):
    # A step budget below the prompts: their first prefill is chunked (and cached) like a long prompt.
    engine = dict(device="cpu", max_model_len=512, max_num_batched_tokens=128, num_decode_steps=4)
    batch = _long_prompts(batch_size)
    off = {"num_speculative_tokens": K, "num_speculative_tokens_per_batch_size": {batch_size: 0}}
    plain = _traced_runs(LLM(target, **engine), batch)
    assert plain[0].count(("decode", batch_size, (1,) * batch_size, 4)) >= 2 * (NEW_TOKENS // 4 - 1)
    assert all(n >= PROMPT_TOKENS - 9 * (batch_size - 1) - 16 for n in plain[2])  # the prompts were cached
    for spec in ({"model": draft, **off}, {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, **off}):
        spec_off = _traced_runs(LLM(target, **engine, speculative_config=spec), batch)
        assert spec_off[0] == plain[0], spec["num_speculative_tokens_per_batch_size"]
        assert spec_off[1:] == plain[1:]
        assert spec_off[3][2] == 0  # no speculative step


def test_drafting_on_is_what_the_trace_would_show(target, draft):
    """The trace tells a speculative step from a plain one (else the test above proves nothing)."""
    steps = _traced_runs(LLM(target, device="cpu", max_model_len=512,
                             speculative_config={"model": draft, "num_speculative_tokens": K}), _long_prompts(1))[0]
    assert any(kind == "spec" for kind, *_ in steps)
