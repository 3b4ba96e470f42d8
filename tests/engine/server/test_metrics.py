"""/metrics: vLLM's metric names with the shrink: prefix, counting what was served."""

from __future__ import annotations

import httpx
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


def test_kv_usage_gauge_reads_the_block_pool(server):
    state = server.state
    bm = server.llm.engine.block_manager
    taken = [bm._take_free() for _ in range(len(bm.blocks) // 2)]  # as a running request would hold them
    try:
        assert scrape(server)["shrink:kv_cache_usage_perc"] == len(taken) / len(bm.blocks)
    finally:
        for b in taken:
            bm.blocks[b].ref_count = 0
            bm.free[b] = None
    assert state.metrics is not None
