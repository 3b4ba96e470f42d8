"""The optional API key (401 otherwise) and the bounded queue (429 with Retry-After when full)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from harness import ServerThread, slow_steps
from openai import AuthenticationError, OpenAI

from engine.server import ServerConfig

BODY = {"prompt": "hi", "max_tokens": 2, "temperature": 0}


def test_api_key_required_on_api_routes_only(tiny_artifact):
    with ServerThread(tiny_artifact, ServerConfig(port=0, api_key="sekrit")) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                r = c.post("/v1/completions", json=BODY, headers=headers)
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models").status_code == 401
            assert c.post("/tokenize", json={"prompt": "a"}).status_code == 401
            assert c.get("/health").status_code == 200
            assert c.get("/metrics").status_code == 200
            ok = c.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sekrit"})
            assert ok.status_code == 200
        assert OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0).models.list().data
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_queue_bound_answers_429_with_retry_after(tiny_artifact):
    # One sequence runs, one may wait: a third engine request is refused until they finish.
    with ServerThread(tiny_artifact, ServerConfig(port=0, max_queue=1, retry_after_s=3),
                      max_num_seqs=1, max_model_len=512, num_decode_steps=1) as s:
        slow_steps(s, 0.002)  # the two long requests then take >= 2 s
        long = {"prompt": [5, 6, 7], "max_tokens": 500, "temperature": 0, "ignore_eos": True}
        results: list[int] = []

        def call() -> None:
            results.append(httpx.post(s.url + "/v1/completions", json=long, timeout=120).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while s.state.admission.in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/completions", json=BODY)
            assert r.status_code == 429, r.text
            assert r.headers["Retry-After"] == "3"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            for t in threads:
                t.join()
            assert results == [200, 200]
            assert s.wait_idle()
            assert c.post("/v1/completions", json={**BODY, "n": 2}).status_code == 200  # room again
            never = c.post("/v1/completions", json={**BODY, "n": 3})  # more than running + waiting
            assert never.status_code == 400 and "at most 2" in never.json()["error"]["message"]
