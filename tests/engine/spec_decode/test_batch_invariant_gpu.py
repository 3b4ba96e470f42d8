"""Batch-invariant mode on the GPU, where the defect was found: bf16, CUDA graphs, a model of
SmolLM2-135M's shape with random weights (nearly uniform logits: near-ties at every step), 4 prompts x
256 greedy tokens. Speculative greedy output must equal plain greedy output token for token, with a
drafter whose drafts are all accepted (the target itself: every verify row scores k + 1 tokens) and
with n-gram drafts (ragged verifies, rejections)."""

from __future__ import annotations

import gc

import pytest
import torch

from engine import LLM, SamplingParams
from eval.bench.common import SHAPES, shape_dir

pytestmark = pytest.mark.gpu

NEW_TOKENS = 256


@pytest.fixture(scope="module")
def smollm2_shape() -> str:
    return shape_dir("smollm2-135m")


def _prompts() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lens = [37, 120, 64, 9]
    # Repeated phrases give the n-gram drafter matches.
    out = []
    for n in lens:
        p = torch.randint(3, SHAPES["smollm2-135m"]["vocab_size"], (n,), generator=g).tolist()
        out.append({"prompt_token_ids": p + p[: n // 2]})
    return out


def _generate(path: str, **kw) -> tuple[list[list[int]], dict]:
    kw = {"max_model_len": 512, "kv_cache_tokens": 16384, **kw}
    llm = LLM(path, device="cuda", dtype="bfloat16", load_format="dummy", batch_invariant=True, **kw)
    engine = llm.engine
    assert engine.runner.graphs is not None  # graphs on
    outs = llm.generate(_prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    m = engine.spec_metrics
    info = {"spec_steps": engine.num_spec_steps, "accepted": m.num_accepted if m else 0,
            "proposed": m.num_proposed if m else 0}
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    return [o.token_ids for o in outs], info


@pytest.mark.parametrize("drafter", ["self", "ngram"])
def test_bf16_graphs_speculative_greedy_equals_plain_greedy(smollm2_shape, drafter):
    plain, _ = _generate(smollm2_shape)
    # "self": the draft is the target's shape with the same seed, so the same random weights.
    spec_config = ({"model": smollm2_shape, "num_speculative_tokens": 4} if drafter == "self" else
                   {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    spec, info = _generate(smollm2_shape, speculative_config=spec_config)
    first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    assert spec == plain, (f"sequence {first} diverges at token "
                           f"{next(j for j, (a, b) in enumerate(zip(plain[first], spec[first])) if a != b)}")
    assert info["spec_steps"] > 0 and info["accepted"] > 0
    if drafter == "self":  # the draft computes what the target does, in the mode too
        assert info["accepted"] == info["proposed"]


def test_bf16_graphs_self_drafting_accepts_every_draft_with_few_decode_rows(smollm2_shape):
    """The H200 check of 2026-11-29 (experiments/batch_invariant_bench.py on the real SmolLM2 teacher,
    BENCHMARKS.md, eighth session): with max_num_seqs 16, 4 prompts of 128 tokens prefilled as decode
    pseudo-rows in forwards of at most 16 rows (32 forwards a step), the target drafting for itself
    accepted only 51% of its drafts and its output left plain greedy at the first token (margin 1.75):
    the mode was not invariant there. Same settings, random weights."""
    g = torch.Generator().manual_seed(1)
    ps = [{"prompt_token_ids": torch.randint(3, SHAPES["smollm2-135m"]["vocab_size"], (128,), generator=g).tolist()}
          for _ in range(4)]
    kw = dict(max_model_len=836, max_num_seqs=16, kv_cache_tokens=17 * 836)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    plain_llm = LLM(smollm2_shape, device="cuda", dtype="bfloat16", load_format="dummy", batch_invariant=True, **kw)
    plain = [o.token_ids for o in plain_llm.generate(ps, params)]
    del plain_llm
    gc.collect()
    torch.cuda.empty_cache()
    spec_llm = LLM(smollm2_shape, device="cuda", dtype="bfloat16", load_format="dummy", batch_invariant=True,
                   speculative_config={"model": smollm2_shape, "num_speculative_tokens": 4}, **kw)
    spec = [o.token_ids for o in spec_llm.generate(ps, params)]
    m = spec_llm.engine.spec_metrics
    assert m.num_accepted == m.num_proposed > 0, f"accepted {m.num_accepted} of {m.num_proposed} self-drafts"
    assert spec == plain
