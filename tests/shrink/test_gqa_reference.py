"""A plain-torch forward of Llama-family models (Llama, Qwen2 with K/V bias, Qwen3 with q/k norm)
that maps query head h to KV head h // (heads // kv_heads) explicitly, one head at a time: the
reference the converted models are checked against (it shares no attention code with transformers).
Also the tiny random models of the GQA tests, and the check that the reference itself is right."""

from __future__ import annotations

import math

import torch
import pytest
import torch.nn.functional as F

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 cores shared with other test runs, 2 threads per process made the
    training steps about 40x slower (threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str = "llama", heads: int = 6, kv_heads: int = 3, head_dim: int = 8, seed: int = 0):
    """A tiny random model; every parameter (norms and biases too) gets noise, so nothing is 0 or 1."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=128, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":  # K/V projections carry a bias
        config = Qwen2Config(**common)
    elif arch == "qwen3":  # explicit head_dim != hidden / heads, and per-head q/k RMSNorm
        config = Qwen3Config(**{**common, "hidden_size": 40, "head_dim": head_dim})
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:
                param.normal_(0.0, 0.15)
    return model


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of one sequence `ids` [T] (float64 throughout)."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    p = {k: v.double() for k, v in model.state_dict().items()}
    T = ids.numel()
    inv = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def lin(x, name):
        out = x @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    x = p["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}"
        h = _rms(x, p[f"{pre}.input_layernorm.weight"], eps)
        q = lin(h, f"{pre}.self_attn.q_proj").view(T, heads, d)
        k = lin(h, f"{pre}.self_attn.k_proj").view(T, kv_heads, d)
        v = lin(h, f"{pre}.self_attn.v_proj").view(T, kv_heads, d)
        if f"{pre}.self_attn.q_norm.weight" in p:
            q = _rms(q, p[f"{pre}.self_attn.q_norm.weight"], eps)
            k = _rms(k, p[f"{pre}.self_attn.k_norm.weight"], eps)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        outs = []
        for hq in range(heads):
            g = hq // (heads // kv_heads)
            scores = (q[:, hq] @ k[:, g].T) / math.sqrt(d)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outs.append(weights @ v[:, g])
        x = x + lin(torch.cat(outs, -1), f"{pre}.self_attn.o_proj")
        h = _rms(x, p[f"{pre}.post_attention_layernorm.weight"], eps)
        x = x + lin(F.silu(lin(h, f"{pre}.mlp.gate_proj")) * lin(h, f"{pre}.mlp.up_proj"), f"{pre}.mlp.down_proj")
    x = _rms(x, p["model.norm.weight"], eps)
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_matches_transformers(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    expected = model(ids[None]).logits[0].double()
    assert torch.allclose(reference_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
