"""A client that goes away cancels its request: the engine aborts it and its KV blocks come back."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from harness import ServerThread, slow_steps
from prometheus_client.parser import text_string_to_metric_families

LONG = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_artifact):
    """Steps of >= 2 ms and room for 400 tokens: a request runs ~1 s, long enough to leave it."""
    with ServerThread(tiny_artifact, max_model_len=512, num_decode_steps=1) as s:
        slow_steps(s, 0.002)
        yield s


def aborted(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        if fam.name == "shrink:request_success":
            return sum(s.value for s in fam.samples if s.labels.get("finished_reason") == "abort"
                       and s.name.endswith("_total"))
    return 0.0


def test_streaming_disconnect_aborts_and_frees_blocks(server):
    before = aborted(server)
    for _ in range(3):
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"]
        # leaving both blocks closes the connection mid-stream
    assert server.wait_idle()
    assert aborted(server) - before == 3


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    before = aborted(server)
    body = json.dumps({**LONG, "n": 2}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while not server.llm.engine.has_unfinished_requests():  # wait until it runs
        assert time.monotonic() < deadline
        time.sleep(0.002)
    sock.close()
    assert server.wait_idle()
    assert aborted(server) - before == 2  # both choices
