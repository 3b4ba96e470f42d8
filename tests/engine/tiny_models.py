"""Tiny random models of each supported architecture, saved as HF directories, for the engine tests."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
NEW_TOKENS = 12  # greedy tokens compared against transformers
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    max_position_embeddings=512, rms_norm_eps=1e-6,
    # Wide weights spread the logits, so greedy argmax is far from ties and a 1e-6 difference in
    # fp32 arithmetic order cannot flip a token.
    initializer_range=0.25,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}

# name -> config factory
ARCHS = {
    "llama_gqa_untied": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_mha_tied": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope_mqa": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                           rope_scaling=LLAMA3_ROPE),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                     tie_word_embeddings=False),
    "qwen2_bias": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3_qknorm": lambda: Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        tie_word_embeddings=False),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer (no merges): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_model_dir(name: str, root: str, seed: int = 0, with_tokenizer: bool = False) -> str:
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = ARCHS[name]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases are zero-initialised by transformers: make them matter
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.25)
    model.save_pretrained(path)
    if with_tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (m,), generator=g).tolist() for m in lens]


def hf_greedy(path: str, token_prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers generate, one prompt at a time (no padding), greedy, no EOS stop."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in token_prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
            outs.append(gen[0, len(p):].tolist())
    return outs


SMALL_VOCAB = 12  # a vocabulary small enough to enumerate every continuation (distribution tests)


def small_vocab_model(path, seed: int) -> str:
    """A one-layer Llama of SMALL_VOCAB tokens with spread-out logits (initializer_range 0.3), saved
    at ``path``: the target and the drafts of the sampled-distribution tests."""
    cfg = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path)


def looping_model_dir(root) -> str:
    """A tiny Llama with small weights (initializer_range 0.05), saved under ``root``: its greedy
    continuations fall into short cycles, which an n-gram lookup predicts (the wide-weight tiny models
    never repeat themselves)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "initializer_range": 0.05}, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    path = os.path.join(str(root), "m")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path
