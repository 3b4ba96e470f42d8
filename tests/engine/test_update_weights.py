"""LLM.update_weights: a live Hugging Face model's weights copied into the engine in place, verified
as a checkpoint is; cached prefixes computed with the old weights are not reused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_update_weights_copies_in_place_and_forgets_cached_prefixes(tiny_teacher):
    llm = LLM(str(tiny_teacher), device="cpu", max_model_len=128, num_kv_blocks=16)  # prefix caching on
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.25)
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(0)).tolist()  # 2 full blocks
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    old = llm.generate({"prompt_token_ids": prompt}, params)[0].token_ids
    engine_params = dict(llm.engine.runner.model.named_parameters())
    storage = {n: p.data_ptr() for n, p in engine_params.items()}
    llm.update_weights(model.named_parameters())
    assert {n: p.data_ptr() for n, p in llm.engine.runner.model.named_parameters()} == storage  # in place
    new = llm.generate({"prompt_token_ids": prompt}, params)[0]
    assert new.token_ids == hf_greedy(model, prompt, 6) != old
    assert new.num_cached_tokens == 0  # the prompt's blocks held the old weights' K/V


def test_update_weights_is_refused_while_requests_run(tiny_teacher):
    llm = LLM(str(tiny_teacher), device="cpu", max_model_len=64, num_kv_blocks=8)
    llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="update_weights: requests are still running"):
        llm.update_weights(model.named_parameters())
