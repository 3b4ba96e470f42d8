"""Every bad request is a 4xx in OpenAI's error body naming the problem, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"prompt": "hi", "max_tokens": 2, "temperature": 0}


def post(server, path: str, body=None, content: bytes | None = None) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        if content is not None:
            return c.post(path, content=content, headers={"Content-Type": "application/json"})
        return c.post(path, json=body)


CASES = [
    # (name, path, json body or raw bytes, status, param, words in the message)
    ("malformed json", "/v1/completions", b'{"prompt": "hi", ', 400, None, "not valid JSON"),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None, "JSON object"),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("missing prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt", "required"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ("prompt too long", "/v1/completions", {"prompt": [5] * 300}, 400, "prompt", "max_model_len"),
    ("token id outside vocab", "/v1/completions", {"prompt": [5, 100000]}, 400, "prompt", "token ids"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("unknown model", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 17}, 400, "n", "at most 16"),
    ("n zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("logprobs too large", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "at most 20"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("min_tokens over max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400,
     "min_tokens", "min_tokens"),
    ("empty stop string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("seed too large", "/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed", "less than or equal"),
    ("penalty", "/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("chat without template", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400,
     "messages", "chat template"),
    ("chat no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("chat top_logprobs too large", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs",
     "at most 20"),
    ("detokenize outside vocab", "/detokenize", {"tokens": [1, -3]}, 400, "tokens", "outside"),
    ("tokenize nothing", "/tokenize", {}, 400, "prompt", "exactly one"),
    ("unknown route", "/v1/nothing", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,status,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_answers_4xx_and_server_keeps_serving(server, name, path, body, status, param, words):
    if isinstance(body, bytes):
        r = post(server, path, content=body)
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    assert error["param"] == param
    good = post(server, "/v1/completions", GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_requests_leave_nothing_behind(server):
    assert server.wait_idle()


def test_get_on_a_post_route_is_405(server):
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
