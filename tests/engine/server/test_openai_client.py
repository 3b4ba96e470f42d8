"""The official openai client against a real server: completions and chat, streamed and not,
n > 1, logprobs, echo; outputs checked against the engine's offline API and transformers."""

from __future__ import annotations

import math

import pytest
import torch
from openai import OpenAI

from engine import LLM, SamplingParams


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_artifact) -> LLM:
    return LLM(tiny_artifact, device="cpu", max_model_len=256, block_size=4)


def test_models_lists_the_served_model(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == [server.state.model_name]


def test_completion_matches_offline_engine_streamed_or_not(server, offline):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = offline.generate(["Hello there", "The sky is"], params)
    c = client(server)
    out = c.completions.create(model=server.state.model_name, prompt=["Hello there", "The sky is"], max_tokens=12,
                               temperature=0, extra_body={"ignore_eos": True})
    assert [ch.index for ch in out.choices] == [0, 1]
    assert [ch.text for ch in out.choices] == [e.text for e in expected]
    assert all(ch.finish_reason == "length" for ch in out.choices)
    assert out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)

    stream = c.completions.create(model=server.state.model_name, prompt="Hello there", max_tokens=12, temperature=0,
                                  stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == expected[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert server.wait_idle()


def test_token_id_prompts_and_n_choices_with_seeds(server):
    c = client(server)
    kw = dict(model=server.state.model_name, prompt=[[5, 6, 7, 8], [9, 10, 11]], max_tokens=8, temperature=1.0,
              n=3, seed=123, extra_body={"ignore_eos": True})
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == list(range(6))
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded: reproducible
    assert len({ch.text for ch in a.choices[:3]}) > 1  # the n choices sample with different seeds
    assert a.usage.completion_tokens == 6 * 8 and a.usage.prompt_tokens == 7

    streamed: dict[int, str] = {}
    for chunk in c.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(6)] == [ch.text for ch in a.choices]


def test_logprobs_of_generated_tokens(server):
    c = client(server)
    out = c.completions.create(model=server.state.model_name, prompt="abc", max_tokens=6, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
        assert all(v <= 0.0 for v in top.values())
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == len("abc")


def test_echo_returns_prompt_logprobs_equal_to_transformers(server, tiny_artifact):
    """The lm-eval request: token ids, max_tokens 1, echo, logprobs 1; the first entry is null."""
    from transformers import AutoModelForCausalLM

    ids = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]
    c = client(server)
    out = c.completions.create(model=server.state.model_name, prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                               echo=True, seed=1234)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_artifact, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    tok = server.llm.engine.tokenizer
    assert out.choices[0].text.startswith(tok.decode(ids))

    # max_tokens 0 (older lm-eval): echo only, nothing generated.
    only = c.completions.create(model=server.state.model_name, prompt=ids, max_tokens=0, temperature=0, logprobs=1,
                                echo=True)
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert only.choices[0].text == tok.decode(ids) and only.usage.completion_tokens == 0
    assert only.choices[0].finish_reason == "length"
    assert all(math.isfinite(x) for x in only.choices[0].logprobs.token_logprobs[1:])


def test_chat_streamed_and_not_with_logprobs(chat_server, chat_model):
    c = client(chat_server)
    messages = [{"role": "user", "content": "Say something."}]
    out = c.chat.completions.create(model=chat_server.state.model_name, messages=messages, max_tokens=10,
                                    temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    content = choice.logprobs.content
    assert len(content) == 10 == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    assert "".join(item.token for item in content) == choice.message.content

    # The prompt is the tokenizer's chat template, without extra special tokens on top.
    tok = chat_server.llm.engine.tokenizer
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tok.encode(templated, add_special_tokens=False))
    offline = LLM(chat_model, device="cpu", max_model_len=256, block_size=4).generate(
        [tok.encode(templated, add_special_tokens=False)], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert choice.message.content == offline[0].text

    chunks = list(c.chat.completions.create(model=chat_server.state.model_name, messages=messages, max_tokens=10,
                                            temperature=0, stream=True, n=2, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    roles = set()
    for chunk in chunks:
        for ch in chunk.choices:
            roles |= {ch.index} if ch.delta.role == "assistant" else set()
            texts[ch.index] += ch.delta.content or ""
    assert roles == {0, 1}
    assert texts[0] == texts[1] == choice.message.content  # greedy: both choices equal
    assert chunks[-1].usage.completion_tokens == 20
    assert chat_server.wait_idle()


def test_streamed_echo_logprobs_equal_non_streamed(server):
    c = client(server)
    kw = dict(model=server.state.model_name, prompt=[[7, 8, 9, 10, 11], [12, 13]], max_tokens=4, temperature=0,
              logprobs=2, echo=True, extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw)
    parts: dict[int, dict] = {}
    for chunk in c.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            p = parts.setdefault(ch.index, {"text": "", "token_logprobs": [], "tokens": []})
            p["text"] += ch.text
            if ch.logprobs is not None:
                p["token_logprobs"] += ch.logprobs.token_logprobs
                p["tokens"] += ch.logprobs.tokens
    for ch in whole.choices:
        assert parts[ch.index]["text"] == ch.text
        assert parts[ch.index]["tokens"] == ch.logprobs.tokens
        assert parts[ch.index]["token_logprobs"] == pytest.approx(ch.logprobs.token_logprobs)
        assert ch.logprobs.token_logprobs[0] is None
