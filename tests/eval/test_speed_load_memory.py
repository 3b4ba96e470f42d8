"""Speed, load and memory records on a tiny model through the real engine: positive, well formed,
and the KV planner equal to what the engine allocated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import save_tiny_artifact, tiny_llama_config
from eval.load import load_test, percentile
from eval.memory import engine_memory, peak_memory_MB, planned_kv_bytes_per_token
from eval.speed import engine_speed, hf_compiles, hf_generate_speed

ENGINE = dict(max_model_len=128, max_num_seqs=4, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_artifact(tmp_path_factory.mktemp("speed") / "m", seed=2)


def _well_formed(records: list[dict], batches: list[int], new_tokens: int) -> None:
    assert [r["batch"] for r in records] == batches
    for r in records:
        assert r["new_tokens"] == new_tokens and r["prompt_len"] == 8
        assert r["prefill_tok_s"] > 0 and r["total_s"] > r["prefill_s"] > 0
        assert r["decode_tok_s"] > 0


def test_engine_speed_records(model_dir: Path):
    from engine import LLM

    llm = LLM(str(model_dir), **ENGINE)
    records = engine_speed(llm, [1, 3], prompt_len=8, new_tokens=12)
    _well_formed(records, [1, 3], 12)


def test_hf_generate_speed_uses_a_static_cache(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = hf_generate_speed(model, [1, 2], prompt_len=8, new_tokens=12)
    _well_formed(records, [1, 2], 12)
    assert all(r["cache"] == "static" for r in records)


def test_load_test_latencies_and_kv_pool_back_to_full(model_dir: Path):
    from engine import AsyncLLM

    llm = AsyncLLM(str(model_dir), **ENGINE)
    rec = load_test(llm, requests=6, concurrency=3, prompt_len=8, max_tokens=10, time_limit_s=60.0)
    assert rec["requests"] == 6 and rec["skipped_by_time_limit"] == 0
    for q in ("ttft", "itl"):
        assert 0 < rec[f"{q}_p50_ms"] <= rec[f"{q}_p99_ms"]
    assert rec["output_tok_s"] > 0 and rec["peak_kv_blocks"] >= 1
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every request's blocks are back


def test_load_time_limit_bounds_the_run(model_dir: Path):
    from engine import AsyncLLM

    rec = load_test(AsyncLLM(str(model_dir), **ENGINE), requests=5, concurrency=1, prompt_len=8, max_tokens=4,
                    time_limit_s=1e-9)
    assert rec["skipped_by_time_limit"] >= 4 and rec["requests"] + rec["skipped_by_time_limit"] == 5


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0


def test_planner_matches_the_engine_pool(model_dir: Path):
    from engine import LLM

    config = tiny_llama_config(num_key_value_heads=1, head_dim=32)
    assert planned_kv_bytes_per_token(config, 2) == 2 * 4 * 1 * 32 * 2
    assert planned_kv_bytes_per_token(tiny_llama_config(), 4) == 2 * 4 * 2 * 16 * 4
    llm = LLM(str(model_dir), kv_cache_tokens=256, **ENGINE)
    mem = engine_memory(llm)
    assert mem["kv_capacity_tokens"] == 256
    assert mem["kv_bytes_per_token_measured"] == mem["kv_bytes_per_token_planned"] == 2 * 4 * 2 * 16 * 4
    assert mem["kv_pool_MB"] == pytest.approx(256 * 2 * 4 * 2 * 16 * 4 / 2**20)
    assert mem["engine_weights_MB"] > 0
    assert mem["engine_compressed_linears"] == 0  # a dense model
    assert peak_memory_MB(torch.device("cpu")) is None


def test_speed_takes_the_fastest_of_repeated_runs(monkeypatch):
    """Noise only adds time: each timing is the fastest of REPEATS runs on fresh prompts, so a stall in
    one run cannot swallow the decode (in the loaded full suite a single-run decode of 7 tokens came
    out <= 0 s and the eval stage reported decode tok/s as None)."""
    import eval.speed as speed

    clock = iter([0.5, 0.2, 0.9])  # seconds of three runs, in order
    seen = []
    monkeypatch.setattr(speed, "timed", lambda fn: (fn(), next(clock)))
    out, seconds = speed.fastest(lambda seed: seen.append(seed) or f"run {seed}", [1, 2, 3])
    assert (out, seconds) == ("run 2", 0.2) and seen == [1, 2, 3]
    assert speed.REPEATS >= 3


@pytest.mark.parametrize("setting,device,teacher,expected", [
    ("auto", "cuda", True, True), ("auto", "cuda", False, False), ("auto", "cpu", True, False),
    ("none", "cuda", True, False), ("teacher", "cpu", True, True), ("teacher", "cuda", False, False),
    ("all", "cpu", False, True), ("all", "cuda", False, True),
])
def test_hf_compile_setting_picks_the_rows(setting, device, teacher, expected):
    assert hf_compiles(setting, device, teacher) is expected


def _generate_kwargs(model: torch.nn.Module, compile: bool) -> tuple[list[dict], list[dict]]:
    """generate's keyword arguments in hf_generate_speed; the calls run eager whatever they ask (a
    real compile on a 2-core CPU costs minutes: this checks what is asked, not torch.compile)."""
    seen: list[dict] = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        return real(*args, **{**kwargs, "disable_compile": True, "compile_config": None})

    model.generate = spy
    try:
        records = hf_generate_speed(model, [1], prompt_len=8, new_tokens=6, compile=compile)
    finally:
        del model.generate  # the class's own again
    return seen, records


def test_hf_generate_asks_for_a_compiled_static_cache_only_when_told(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eager, records = _generate_kwargs(model, compile=False)
    assert all(k["disable_compile"] is True and "compile_config" not in k for k in eager)
    assert records[0]["compiled"] is False and records[0]["cache"] == "static"
    compiled, records = _generate_kwargs(model, compile=True)
    probe, *rest = compiled  # the static-cache probe runs eager: a compile error must not read as "no static cache"
    assert probe["disable_compile"] is True and "compile_config" not in probe
    assert all(k["cache_implementation"] == "static" and k["disable_compile"] is False for k in rest)
    assert all(k["compile_config"]._compile_all_devices for k in rest)  # compiles on a CPU too
    assert records[0]["compiled"] is True and records[0]["cache"] == "static"
    # two untimed runs at the timed length compile (and capture) before any timing
    assert [k["max_new_tokens"] for k in compiled[:3]] == [2, 6, 6] and len(compiled) == len(eager) + 2


def test_transformers_measurements_compile_the_rows_the_setting_names(model_dir: Path, monkeypatch):
    import eval.transformers_run as transformers_run
    from eval.settings import HarnessSettings
    from eval.transformers_run import TransformersMeasurements

    asked: list[bool] = []

    def fake_speed(model, batch_sizes, prompt_len, new_tokens, compile=False):
        asked.append(compile)
        return [{"batch": 1, "decode_tok_s": 1.0, "cache": "static", "compiled": compile}]

    monkeypatch.setattr(transformers_run, "hf_generate_speed", fake_speed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for setting, expected in (("auto", [False, False]), ("teacher", [True, False]), ("all", [True, True])):
        harness = HarnessSettings.from_dict({"agreement": {"enabled": False}, "speed": {"hf_compile": setting}})
        measure = TransformersMeasurements(harness, {}, {}, {}, {})
        asked.clear()
        rows = [measure.measure(name, name, lambda: model, name == "teacher")[0] for name in ("teacher", "student")]
        assert asked == expected, setting
        assert [r["hf_generate"] for r in rows] == [f"static cache, {'compiled' if e else 'eager'}" for e in expected]
