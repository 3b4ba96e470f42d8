"""speculative_config parsing (every bad key named) and the draft vocabulary check."""

from __future__ import annotations

import pytest

from common.errors import ShrinkError
from engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError, check_same_vocabulary


@pytest.fixture
def draft_dir(model_dir):
    return model_dir("llama_mha_tied", with_tokenizer=True)


def test_draft_model_config(draft_dir):
    cfg = SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 4})
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens, cfg.dtype) == ("draft_model", draft_dir, 4, "auto")
    assert cfg.k_for_batch(1) == cfg.k_for_batch(512) == 4
    cfg = SpeculativeConfig.from_dict({"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 2,
                                       "dtype": "bfloat16"})
    assert cfg.dtype == "bfloat16"
    assert SpeculativeConfig.from_dict(None) is None
    assert SpeculativeConfig.from_dict(cfg) is cfg


def test_ngram_config_and_vllm_defaults():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                                       "prompt_lookup_max": 4})
    assert (cfg.method, cfg.prompt_lookup_min, cfg.prompt_lookup_max, cfg.model) == ("ngram", 2, 4, None)
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)
    neither = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (neither.prompt_lookup_min, neither.prompt_lookup_max) == (5, 5)


def test_batch_size_policy():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5,
                                       "num_speculative_tokens_per_batch_size": {"1": 5, 4: 3, 16: 1}})
    assert [cfg.k_for_batch(b) for b in (1, 2, 4, 5, 16, 17, 256)] == [5, 3, 3, 1, 1, 0, 0]
    off = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                       "num_speculative_tokens_per_batch_size": {8: 0}})
    assert off.k_for_batch(1) == 0


def test_auto_policy_is_opt_in(draft_dir):
    """"auto": the engine's measured policy chooses k (up to num_speculative_tokens); without the key
    k is num_speculative_tokens at every batch size, and an explicit table is taken as written."""
    auto = SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 4,
                                        "num_speculative_tokens_per_batch_size": "auto"})
    assert auto.auto and auto.k_by_batch_size == () and auto.k_for_step(16) == 4 and auto.k_for_step(17) == 0
    ngram = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                         "num_speculative_tokens_per_batch_size": "auto"})
    assert ngram.auto
    assert not SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 4}).auto
    table = SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 4,
                                         "num_speculative_tokens_per_batch_size": {4: 2}})
    assert not table.auto and table.k_for_step(4) == 2


@pytest.mark.parametrize("raw,key", [
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "num_speculative_tokens"),
    ({"method": "eagle", "num_speculative_tokens": 4}, "method"),
    ({"num_speculative_tokens": 4}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 4, "model": "x"}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_mn": 2}, "prompt_lookup_mn"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 4, "dtype": "float16"}, "dtype"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": {}},
     "num_speculative_tokens_per_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": "Auto"},
     "num_speculative_tokens_per_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": {4: 5}},
     "num_speculative_tokens_per_batch_size[4]"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": {0: 1}},
     "num_speculative_tokens_per_batch_size[0]"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": {"4": 1, 4: 2}},
     "num_speculative_tokens_per_batch_size[4]"),
    ({"model": "/no/such/dir", "num_speculative_tokens": 4}, "model"),
    ({"model": "", "num_speculative_tokens": 4}, "model"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(SpeculativeConfigError) as err:
        SpeculativeConfig.from_dict(raw)
    assert err.value.key == key
    assert f"speculative_config.{key}:" in str(err.value)
    assert isinstance(err.value, ShrinkError) and isinstance(err.value, ValueError)


def test_draft_only_keys(draft_dir):
    with pytest.raises(SpeculativeConfigError, match="prompt_lookup_min"):
        SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    with pytest.raises(SpeculativeConfigError, match=r"speculative_config\.dtype"):
        SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 2, "dtype": "fp8"})
    with pytest.raises(SpeculativeConfigError, match="expected a dict"):
        SpeculativeConfig.from_dict([("model", draft_dir)])


@pytest.mark.parametrize("value", [2, 0, True, "1"])
def test_a_sharded_draft_model_is_refused_by_name(draft_dir, value):
    """vLLM's draft_tensor_parallel_size: the draft runs whole on rank 0, so only 1 is taken."""
    with pytest.raises(SpeculativeConfigError, match=r"speculative_config\.draft_tensor_parallel_size: .*only 1"):
        SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 2,
                                     "draft_tensor_parallel_size": value})
    ok = SpeculativeConfig.from_dict({"model": draft_dir, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1})
    assert ok.method == "draft_model"
    with pytest.raises(SpeculativeConfigError, match=r"speculative_config\.draft_tensor_parallel_size: unknown key"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1})


# -- vocabulary --------------------------------------------------------------------------------------
def _load(path):
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_same_vocabulary_passes_across_architectures(model_dir):
    target = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    draft = _load(model_dir("qwen2_bias", with_tokenizer=True))
    check_same_vocabulary(*target, *draft)
    check_same_vocabulary(target[0], None, draft[0], None)  # configs only, when a side has no tokenizer


def test_vocab_size_mismatch(model_dir):
    target_cfg, tok = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    draft_cfg = type(target_cfg).from_dict({**target_cfg.to_dict(), "vocab_size": target_cfg.vocab_size + 64})
    with pytest.raises(SpeculativeConfigError, match="vocab_size 320 differs from the target's 256"):
        check_same_vocabulary(target_cfg, tok, draft_cfg, tok)


def test_special_token_id_mismatch(model_dir):
    target_cfg, tok = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    draft_cfg = type(target_cfg).from_dict({**target_cfg.to_dict(), "eos_token_id": 7})
    with pytest.raises(SpeculativeConfigError, match="eos_token_id"):
        check_same_vocabulary(target_cfg, tok, draft_cfg, tok)


def test_token_strings_mismatch(model_dir):
    """Same size, same ids for specials, but the tokens behind the ids differ: a permuted vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    target_cfg, tok = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: (i + 1) % len(alphabet) for i, ch in enumerate(alphabet)}  # every id shifted by one
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    shifted = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(SpeculativeConfigError, match="token id 0 is"):
        check_same_vocabulary(target_cfg, tok, target_cfg, shifted)


def test_tokenizer_covering_fewer_ids_than_the_target(model_dir):
    """A draft tokenizer that names fewer of the vocab_size ids (here: ids past 200 unknown to it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    target_cfg, tok = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    alphabet = sorted(ByteLevel.alphabet())[:200]
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    small = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(SpeculativeConfigError, match="names 200 of the 256 token ids, the target's 256"):
        check_same_vocabulary(target_cfg, tok, target_cfg, small)


def test_tokens_added_past_vocab_size_do_not_matter(model_dir):
    target_cfg, tok = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    _, bigger = _load(model_dir("llama_gqa_untied", with_tokenizer=True))
    bigger.add_tokens(["<extra>"])  # id 256: no logit of either model
    check_same_vocabulary(target_cfg, tok, target_cfg, bigger)


# -- the draft runner's EngineConfig -----------------------------------------------------------------
def _target(model_dir):
    from transformers import AutoTokenizer

    from engine.config import EngineConfig

    path = model_dir("llama_gqa_untied", with_tokenizer=True)
    return EngineConfig(model=path, device="cpu", block_size=8, max_model_len=256), AutoTokenizer.from_pretrained(path)


def test_draft_engine_config_shares_the_targets_settings(model_dir):
    from engine.spec_decode.config import draft_engine_config

    target, tok = _target(model_dir)
    draft_path = model_dir("qwen2_bias", with_tokenizer=True)
    spec = SpeculativeConfig.from_dict({"model": draft_path, "num_speculative_tokens": 3, "dtype": "float32"})
    cfg = draft_engine_config(target, tok, spec, num_kv_blocks=77)
    assert (cfg.model, cfg.hf_config.model_type, cfg.num_kv_blocks) == (draft_path, "qwen2", 77)
    assert (cfg.block_size, cfg.max_model_len, cfg.device, cfg.dtype) == (8, 256, "cpu", "float32")
    assert target.model != cfg.model and target.hf_config.model_type == "llama"  # the target's is untouched


def test_the_draft_of_a_tensor_parallel_target_has_one_rank(model_dir):
    """Under tensor parallelism the target is sharded, the draft runs whole on rank 0."""
    from dataclasses import replace

    from engine.spec_decode.config import draft_engine_config

    target, tok = _target(model_dir)
    target = replace(target, tensor_parallel_size=2)
    spec = SpeculativeConfig.from_dict({"model": model_dir("qwen2_bias", with_tokenizer=True),
                                        "num_speculative_tokens": 3})
    assert draft_engine_config(target, tok, spec).tensor_parallel_size == 1
    assert target.tensor_parallel_size == 2


def test_draft_engine_config_rejects_what_cannot_serve(model_dir, tmp_path):
    from transformers import AutoConfig

    from engine.spec_decode.config import draft_engine_config

    target, tok = _target(model_dir)
    ngram = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(SpeculativeConfigError, match="has no draft model"):
        draft_engine_config(target, tok, ngram)
    short = tmp_path / "short"
    cfg = AutoConfig.from_pretrained(model_dir("llama_mha_tied"))
    cfg.max_position_embeddings = 128
    cfg.save_pretrained(short)
    spec = SpeculativeConfig.from_dict({"model": str(short), "num_speculative_tokens": 2})
    with pytest.raises(SpeculativeConfigError, match="128 positions .* max_model_len is 256"):
        draft_engine_config(target, tok, spec)
    other = tmp_path / "other_vocab"
    cfg.max_position_embeddings = 512
    cfg.vocab_size = 300
    cfg.save_pretrained(other)
    spec = SpeculativeConfig.from_dict({"model": str(other), "num_speculative_tokens": 2})
    with pytest.raises(SpeculativeConfigError, match="vocab_size 300"):
        draft_engine_config(target, tok, spec)
