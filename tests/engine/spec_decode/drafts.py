"""Draft models for the speculative decoding tests: the target plus noise, so that a draft agrees
with the target part of the time."""

from __future__ import annotations

import os
import shutil

import torch
from transformers import AutoModelForCausalLM


def perturbed_copy(src: str, dst: str, sigma: float, seed: int = 1) -> str:
    """The target's weights plus N(0, sigma) noise (with its tokenizer): a drafter that agrees with
    the target part of the time (sigma 0.008: about 40% of the draft tokens are accepted)."""
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(src, name), dst)
    return dst


def medusa_heads(target: str, dst: str, num_heads: int, sigma: float, seed: int = 1, num_layers: int = 1,
                 tokenizer: bool = True) -> str:
    """Medusa heads for ``target`` (common/medusa.py's artifact, with the target's tokenizer files):
    N(0, sigma) weights and biases, so that they draft something other than the target's own next
    token and disagree with the target most of the time (sigma 0: every head predicts what the LM
    head does at the same row)."""
    from transformers import AutoConfig

    from common.medusa import MedusaHeads, save_heads

    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    cfg = AutoConfig.from_pretrained(target)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * sigma)
    os.makedirs(dst, exist_ok=True)
    save_heads(heads, dst)
    if tokenizer:
        for name in os.listdir(target):
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                shutil.copy(os.path.join(target, name), dst)
    return dst


def fitted_medusa_heads(target: str, dst: str, token_prompts: list[list[int]], num_heads: int, new_tokens: int = 32,
                        steps: int = 60, seed: int = 1) -> str:
    """Medusa heads fitted for a few Adam steps to the target's own greedy continuations of
    ``token_prompts`` (head i: the token i + 1 after each position's next one), from the final hidden
    states transformers gives: heads that are right part of the time on those prompts, so that a
    test sees acceptances and rejections both."""
    from transformers import AutoConfig

    from common.medusa import MedusaHeads, save_heads

    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    cfg = AutoConfig.from_pretrained(target)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads)
    feats, labels = [], []
    with torch.no_grad():
        for p in token_prompts:
            ids = torch.tensor([p])
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
            hidden = model(seq[None], output_hidden_states=True).hidden_states[-1][0]  # after the final norm
            n = len(seq)
            for t in range(len(p) - 1, n - 1 - num_heads):  # f_t gave token t + 1; head i predicts t + 2 + i
                feats.append(hidden[t])
                labels.append(seq[t + 2 : t + 2 + num_heads])
    feats, labels = torch.stack(feats), torch.stack(labels)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model.lm_head(heads(feats))  # [heads, N, V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.t().reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(dst, exist_ok=True)
    save_heads(heads, dst)
    return dst


def assert_stops_inside_accepted_runs(llm, base: list[list[int]], prompt_ids: list[dict], max_tokens: int,
                                      cut: int) -> None:
    """With a drafter whose every draft is accepted (``llm``), the stops land inside accepted runs and
    cut them there: a stop token (row 0: ``base[0][6]``), a stop string (row 1: what its tokens
    ``cut``.. start with), ``max_tokens`` 11 (row 2); other rows run to ``max_tokens`` unchanged.
    ``base``: plain greedy decoding's tokens of ``prompt_ids`` at ``max_tokens``."""
    from engine import SamplingParams

    def greedy(n: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)

    stop_token = base[0][6]
    text1 = llm.tokenizer.decode(base[1])
    stop_text = text1[len(llm.tokenizer.decode(base[1][:cut])) :][:2]
    params = [greedy(max_tokens, stop_token_ids=[stop_token]), greedy(max_tokens, stop=[stop_text]), greedy(11)]
    out = llm.generate(prompt_ids, params + [greedy(max_tokens)] * (len(base) - 3))
    assert out[0].token_ids == base[0][: base[0].index(stop_token) + 1] and out[0].stop_reason == stop_token
    assert out[1].finish_reason == "stop" and out[1].stop_reason == stop_text
    assert stop_text not in out[1].text and base[1][: len(out[1].token_ids)] == out[1].token_ids
    assert out[1].text == text1[: text1.find(stop_text)]
    assert out[2].token_ids == base[2][:11] and out[2].finish_reason == "length"
    assert [o.token_ids for o in out[3:]] == base[3:]


def assert_mixed_batch_matches_plain(plain: list, spec: list, params: list) -> None:
    """A batch of greedy rows (with and without logprobs) beside sampled rows: every row ran to its
    max_tokens, greedy rows equal plain decoding (``plain``) token for token and in their logprobs,
    sampled rows' logprobs hold their own tokens."""
    import pytest

    for i, (a, b) in enumerate(zip(plain, spec)):
        assert len(b.token_ids) == params[i].max_tokens
        if params[i].greedy:
            assert a.token_ids == b.token_ids
            if params[i].logprobs is not None:
                assert len(b.logprobs) == len(b.token_ids)
                for la, lb, t in zip(a.logprobs, b.logprobs, b.token_ids):
                    assert la.keys() == lb.keys()
                    assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4)
                    assert lb[t].rank == la[t].rank
        elif params[i].logprobs is not None:
            assert [t in lp for t, lp in zip(b.token_ids, b.logprobs)] == [True] * len(b.token_ids)
