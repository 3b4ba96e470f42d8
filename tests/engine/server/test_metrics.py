"""/metrics: vLLM's metric names with the shrink: prefix, counting what was served."""

from __future__ import annotations

import threading
import time

import httpx
from harness import ServerThread, slow_steps
from prometheus_client.parser import text_string_to_metric_families

NAMES = [
    "shrink:time_to_first_token_seconds", "shrink:inter_token_latency_seconds", "shrink:time_per_output_token_seconds",
    "shrink:e2e_request_latency_seconds", "shrink:num_requests_running", "shrink:num_requests_waiting",
    "shrink:kv_cache_usage_perc", "shrink:prompt_tokens", "shrink:generation_tokens", "shrink:request_success",
    "shrink:spec_decode_num_drafts", "shrink:spec_decode_num_draft_tokens", "shrink:spec_decode_num_accepted_tokens",
]


def scrape(server) -> dict[str, float]:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    families = list(text_string_to_metric_families(r.text))
    assert set(NAMES) <= {f.name for f in families}
    for fam in families:
        for s in fam.samples:
            key = s.name + "".join(f"{{{s.labels['finished_reason']}}}" for _ in [0] if "finished_reason" in s.labels)
            values[key] = values.get(key, 0.0) + s.value
    return values


def test_metrics_count_tokens_requests_and_latencies(server):
    assert server.wait_idle()
    before = scrape(server)
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    stream = httpx.post(server.url + "/v1/completions", json={**body, "n": 1, "stream": True}, timeout=60)
    assert stream.text.rstrip().endswith("data: [DONE]")
    after = scrape(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("shrink:prompt_tokens_total") == 3 * 4
    assert delta("shrink:generation_tokens_total") == 3 * 6
    assert delta("shrink:request_success_total{length}") == 3
    assert delta("shrink:time_to_first_token_seconds_count") == 3
    assert delta("shrink:e2e_request_latency_seconds_count") == 3
    assert delta("shrink:time_per_output_token_seconds_count") == 3
    assert delta("shrink:inter_token_latency_seconds_count") == 3 * 5
    assert after["shrink:num_requests_running"] == 0 and after["shrink:num_requests_waiting"] == 0
    assert after["shrink:kv_cache_usage_perc"] == 0.0


def test_gauges_show_a_running_request(tiny_artifact):
    with ServerThread(tiny_artifact, max_model_len=512, num_decode_steps=1) as s:
        slow_steps(s, 0.002)  # 400 tokens then take >= 0.8 s
        body = {"prompt": [5] * 40, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        worker = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=body, timeout=120))
        worker.start()
        deadline = time.monotonic() + 30
        while not s.llm.engine.scheduler.running:  # admitted, its blocks allocated
            assert time.monotonic() < deadline
            time.sleep(0.002)
        during = scrape(s)
        worker.join()
        bm = s.llm.engine.block_manager
        assert during["shrink:num_requests_running"] == 1
        assert during["shrink:kv_cache_usage_perc"] >= 10 / bm.num_blocks  # 40 prompt tokens in blocks of 4
        assert s.wait_idle() and scrape(s)["shrink:kv_cache_usage_perc"] == 0.0
