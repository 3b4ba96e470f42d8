"""experiments/drafter_bench.py --smoke: trains the TVD drafter and its CE baseline on the same
teacher samples and budget, measures greedy acceptance per workload and k with the engine, and checks
one real speculative run against plain greedy decoding (CPU, tiny teacher)."""

from __future__ import annotations

import json
from pathlib import Path

from support import load_experiment


def test_drafter_bench_smoke(tiny_teacher: Path, shared_data_dir: Path, tmp_path: Path, monkeypatch):
    """The script's main() in this process (its training runs are still `python -m shrink`
    subprocesses): a process of its own would only add an interpreter and torch start-up."""
    out, lines = tmp_path / "out", tmp_path / "results.jsonl"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (its training subprocesses: one thread, as before)
    load_experiment("drafter_bench").main(
        ["--teacher", str(tiny_teacher), "--data-dir", str(shared_data_dir), "--out", str(out), "--cache-dir",
         str(tmp_path / "cache"), "--device", "cpu", "--smoke", "--keep", "first:2", "--json", str(lines)])
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    by = lambda bench: [r for r in rows if r["bench"] == bench]  # noqa: E731
    trained = {r["loss"]: r for r in by("drafter_train")}
    assert set(trained) == {"tvd", "ce"}
    assert trained["tvd"]["kept_layers"] == trained["ce"]["kept_layers"] == [0, 1]
    assert trained["tvd"]["train_tokens"] == trained["ce"]["train_tokens"] >= 2048
    assert trained["tvd"]["teacher_data"] == trained["ce"]["teacher_data"]  # the same samples, generated once
    assert "val_tvd" in trained["tvd"] and "val_ce" in trained["ce"]
    acceptance = by("drafter_acceptance")
    drafters = {"tvd[first:2]", "ce[first:2]", "init[0,1]"}
    assert {(r["workload"], r["drafter"], r["k"]) for r in acceptance} == {
        (w, d, k) for w in ("wikitext", "cqa", "gsm8k") for d in drafters for k in (1, 2, 4)}
    for r in acceptance:
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and 1.0 <= r["mean_accepted_length"] <= r["k"] + 1
        assert r["num_emitted_tokens"] == r["prompts"] * r["new_tokens"]
    assert {r["drafter"] for r in by("drafter_summary")} == drafters
    (compare,) = by("drafter_tvd_vs_ce")
    assert set(compare["mean_accepted_length_ratio"]) == {"1", "2", "4"}
    (check,) = by("drafter_engine_check")
    assert check["greedy_equal"] is True and check["num_proposed_tokens"] > 0
    (total,) = by("drafter_bench_total")
    assert total["wall_s"] >= sum(r["process_s"] for r in trained.values()) > 0


def test_each_engine_is_gone_before_the_next_is_built(monkeypatch):
    """run_engine drops its engine before returning: the next engine sizes its KV pool from the free
    memory (the teacher's engine, still referenced by the caller, left a drafter 0 KV blocks on the H200)."""
    import gc
    import weakref

    import engine as engine_pkg

    bench = load_experiment("drafter_bench")
    built: list[weakref.ref] = []
    alive_at_build: list[int] = []

    class FakeLLM:
        def __init__(self, path, **kwargs):
            gc.collect()
            alive_at_build.append(sum(ref() is not None for ref in built))
            built.append(weakref.ref(self))
            self.path, self.kwargs = path, kwargs

    monkeypatch.setattr(engine_pkg, "LLM", FakeLLM)
    first = bench.run_engine("teacher", {"device": "cpu"}, lambda llm: [llm.path])
    second = bench.run_engine("drafter", {"device": "cpu"}, lambda llm: (llm.path, llm.kwargs), extra=1)
    assert first == ["teacher"] and second == ("drafter", {"device": "cpu", "extra": 1})
    assert alive_at_build == [0, 0] and all(ref() is None for ref in built)
