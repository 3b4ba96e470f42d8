"""Load: 64 concurrent clients send 500 mixed requests (streamed, not streamed, 10% leaving
midway). No 5xx, every completed response well-formed, and the KV pool full again afterwards."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

CLIENTS = 64
REQUESTS = 500
TIME_LIMIT_S = 240


def request_body(rng: random.Random) -> dict:
    prompt = rng.choice([
        [rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))],
        "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 60))),
    ])
    body = {"prompt": prompt, "max_tokens": rng.randrange(1, 9), "temperature": rng.choice([0.0, 0.8]),
            "n": rng.choice([1, 1, 1, 2]), "seed": rng.randrange(1000), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.2:
        body["logprobs"] = 2
    return body


def check_completion(body: dict, out: dict) -> None:
    assert out["object"] == "text_completion"
    assert sorted(c["index"] for c in out["choices"]) == list(range(body["n"]))
    for c in out["choices"]:
        assert isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length")
        if "logprobs" in body:
            assert len(c["logprobs"]["tokens"]) == len(c["logprobs"]["token_logprobs"]) >= 1
    usage = out["usage"]
    assert 1 <= usage["completion_tokens"] <= body["n"] * body["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_stream(body: dict, lines: list[str]) -> None:
    events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finished: dict[int, str] = {}
    for ev in events[:-1]:
        chunk = json.loads(ev)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            assert isinstance(c["text"], str)
            if c["finish_reason"] is not None:
                assert c["index"] not in finished
                finished[c["index"]] = c["finish_reason"]
    assert sorted(finished) == list(range(body["n"]))
    assert set(finished.values()) <= {"stop", "length"}


async def run_load(url: str) -> dict[str, int]:
    rng = random.Random(7)
    plan = [(request_body(rng), rng.choices(["plain", "stream", "leave"], [45, 45, 10])[0]) for _ in range(REQUESTS)]
    todo: asyncio.Queue = asyncio.Queue()
    for item in plan:
        todo.put_nowait(item)
    counts = {"plain": 0, "stream": 0, "leave": 0}

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while not todo.empty():
                body, kind = todo.get_nowait()
                if kind == "plain":
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    check_completion(body, r.json())
                else:
                    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        assert r.status_code == 200
                        lines = []
                        async for line in r.aiter_lines():
                            lines.append(line)
                            if kind == "leave" and line.startswith("data: "):
                                break  # leaving the block closes the connection midway
                    if kind == "stream":
                        check_stream(body, lines)
                counts[kind] += 1

    await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), TIME_LIMIT_S)
    return counts


def test_64_clients_500_mixed_requests(server):
    started = time.monotonic()
    counts = asyncio.run(run_load(server.url))
    assert sum(counts.values()) == REQUESTS and counts["leave"] > 20
    assert server.wait_idle(timeout=60)  # every block back in the pool, nothing admitted
    assert time.monotonic() - started < TIME_LIMIT_S
    # the server still serves
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
