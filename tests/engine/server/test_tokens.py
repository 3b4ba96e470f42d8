"""/tokenize, /detokenize, /tokenizer_info answer as vLLM's do (lm-eval's remote tokenizer reads them)."""

from __future__ import annotations

import httpx


def test_tokenize_detokenize_and_tokenizer_info(chat_server):
    tok = chat_server.llm.engine.tokenizer
    with httpx.Client(base_url=chat_server.url, timeout=60) as c:
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
        assert info["model_max_length"] == chat_server.state.max_model_len

        r = c.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
        assert r["tokens"] == tok.encode("Hello world", add_special_tokens=False) and r["count"] == len(r["tokens"])
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}

        messages = [{"role": "user", "content": "Hi"}]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat["tokens"] == tok.encode(text, add_special_tokens=False)


def test_prompt_logprobs_reach_the_first_delta_only(chat_server):
    """The engine hands prompt logprobs on the first RequestDelta (what echo needs), once."""
    import asyncio

    from engine import AsyncLLM, LLM, SamplingParams

    path = chat_server.llm.engine.config.model
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    prompt = [5, 6, 7, 8, 9, 10]
    expected = LLM(path, device="cpu", max_model_len=64, block_size=4).generate([prompt], params)[0].prompt_logprobs
    llm = AsyncLLM(path, device="cpu", max_model_len=64, block_size=4)

    async def deltas():
        out = [d async for d in llm.generate(prompt, params)]
        await llm.shutdown()
        return out

    got = asyncio.run(deltas())
    assert got[0].prompt_logprobs is not None and all(d.prompt_logprobs is None for d in got[1:])
    assert len(got[0].prompt_logprobs) == len(prompt) and got[0].prompt_logprobs[0] is None
    for a, b in zip(got[0].prompt_logprobs[1:], expected[1:]):
        assert {t: lp.logprob for t, lp in a.items()} == {t: lp.logprob for t, lp in b.items()}
