"""stage=eval end to end on a tiny run: every measurement, the speculative row, the plots and the
plain-words table; each measurement skippable; bad eval keys refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support import run_cli, run_main, save_tiny_artifact

TINY = ["logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64", "eval.context=64",
        "eval.stride=32", "eval.max_windows=2", "eval.datasets=[heldout]", "eval.engine.max_model_len=256"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_run(tiny_teacher: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run / "teacher")
    save_tiny_artifact(run / "distill", seed=1, num_hidden_layers=2)
    return run


def test_every_measurement_and_the_speculative_row(tiny_teacher: Path, tmp_path: Path, shared_data_dir: Path):
    run = _tiny_run(tiny_teacher, tmp_path)
    result = run_main("stage=eval", f"run={run}", *TINY, "eval.tasks.limit=2", "eval.speculative=true",
                      "eval.speculative_settings.num_speculative_tokens=3", f"data_dir={shared_data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = run / "eval"
    report = json.loads((out / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    spec_name = "teacher+distill (speculative, k=3)"
    assert list(rows) == ["teacher", "distill", spec_name]
    teacher, distill, spec = rows["teacher"], rows["distill"], rows[spec_name]
    assert teacher["top1_agreement"] == 1.0 and abs(teacher["kl_to_teacher"]) < 1e-6
    assert 0.0 <= distill["top1_agreement"] < 1.0 and distill["kl_to_teacher"] > 0
    for row in (teacher, distill, spec):
        assert "engine_error" not in row, row.get("engine_error")
        for task in ("cqa", "svamp", "gsm8k", "cqa_mc"):
            assert 0.0 <= row[f"acc_{task}"] <= 1.0
        assert 0.0 <= row["acc_norm_cqa_mc"] <= 1.0
        for key in ("prefill_tok_s_b1", "decode_tok_s_b1", "prefill_tok_s_b4", "decode_tok_s_b4",
                    "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "kv_capacity_tokens"):
            assert row[key] > 0, key
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["kv_bytes_per_token_measured"] == row["kv_bytes_per_token_planned"]
    for row in (teacher, distill):
        assert row["ppl_heldout"] > 1.0 and row["hf_decode_tok_s_b1"] > 0 and row["hf_decode_tok_s_b4"] > 0
    assert distill["kv_bytes_per_token"] == teacher["kv_bytes_per_token"] // 2  # 4 -> 2 layers
    assert spec["ppl_heldout"] == teacher["ppl_heldout"]
    # the prompt's log-likelihoods are the target's alone: a draft changes no multiple-choice score
    assert (spec["acc_cqa_mc"], spec["acc_norm_cqa_mc"]) == (teacher["acc_cqa_mc"], teacher["acc_norm_cqa_mc"])
    for ours, theirs in zip(*(report["details"][n]["task_cqa_mc"]["examples"] for n in (spec_name, "teacher"))):
        assert ours["loglikelihoods"] == pytest.approx(theirs["loglikelihoods"], abs=1e-4)
    assert 0.0 <= spec["spec_acceptance_rate"] <= 1.0 and spec["spec_mean_accepted_length"] >= 1.0
    assert report["details"][spec_name]["spec_decode"]["num_proposed_tokens"] > 0
    assert report["details"]["teacher"]["task_cqa"]["n"] == 2
    mc = report["details"]["teacher"]["task_cqa_mc"]
    assert mc["n"] == 2 and mc["errors"] == 0
    assert report["settings"]["perplexity"] == {"heldout": {"context": 64, "stride": 32, "max_windows": 2,
                                                            "full_windows_only": False}}
    notes = "\n".join(report["notes"])
    assert "ppl_heldout: the validation split of the run's data, sliding windows of 64 tokens, stride 32" in notes
    assert "acc_cqa_mc / acc_norm_cqa_mc" in notes and "acc_cqa / acc_svamp / acc_gsm8k" in notes
    assert "hf_compile=auto; compiled: none" in notes  # auto on a CPU: eager
    assert teacher["hf_generate"] == "static cache, eager"
    md = (out / "report.md").read_text()
    assert "## Against the teacher" in md and md.count("| teacher |") == 1
    assert f"- distill: {teacher['size_MB'] / distill['size_MB']:.1f}x smaller, " in md
    assert "faster decode" in md or "slower decode" in md or "same decode speed" in md
    for name in ("frontier.png", "stages.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert f"![{name}]({name})" in md
    assert "report at" in result.stdout


def test_measurements_can_be_skipped(tiny_teacher: Path, tmp_path: Path):
    run = _tiny_run(tiny_teacher, tmp_path)
    off = ["eval.tasks.enabled=false", "eval.agreement.enabled=false", "eval.speed.enabled=false",
           "eval.load.enabled=false", "eval.plots=false"]
    result = run_main("stage=eval", f"run={run}", *TINY, *off)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((run / "eval" / "report.json").read_text())["rows"]
    measured = {k for r in rows for k in r}
    assert not any(k.startswith(("acc_", "top1", "decode_tok", "hf_", "ttft", "itl")) for k in measured), measured
    assert all(r["ppl_heldout"] > 1.0 and r["kv_capacity_tokens"] > 0 for r in rows)
    assert not (run / "eval" / "frontier.png").exists()


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_keys_fail_before_any_work(tiny_teacher: Path, tmp_path: Path):
    run = _tiny_run(tiny_teacher, tmp_path)
    _one_line_error(run_cli("stage=eval", f"run={run}", *TINY, "eval.speed.batch_sizes=[0]"), "eval.speed.batch_sizes")
    _one_line_error(run_cli("stage=eval", f"run={run}", *TINY, "eval.speculative=true",
                            "eval.speculative_settings.draft=nope"), "eval.speculative_settings.draft", "nope")
    assert not (run / "eval").exists()


def test_a_bad_eval_key_stops_the_pipeline_before_its_first_stage(tmp_path: Path):
    run = tmp_path / "run"
    _one_line_error(run_cli("stage=pipeline", f"run={run}", "logging=none", "eval.load.requests=0"),
                    "eval.load.requests")
    assert not (run / "teacher").exists()


def test_a_run_stopped_midway_keeps_what_it_measured(tiny_teacher: Path, tmp_path: Path, monkeypatch):
    """The perplexity / transformers cache is written after every artifact, not only at the end: an
    eval cut off during its second artifact (a device call's time limit) keeps the first one's
    numbers, and the next run reuses them."""
    import shrink.stages.evaluate as evaluate
    from shrink.__main__ import compose, run as run_stage

    run = _tiny_run(tiny_teacher, tmp_path)
    calls: list[str] = []

    def stop_at_the_second(art_dir, *args, **kwargs):
        calls.append(Path(art_dir).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("the machine went away")

    monkeypatch.setattr(evaluate, "_engine_measurements", stop_at_the_second)
    cfg = compose(["stage=eval", f"run={run}", f"cache_dir={tmp_path / 'cache'}", *TINY, "eval.tasks.enabled=false",
                   "eval.speed.enabled=false", "eval.load.enabled=false", "eval.agreement.enabled=false"])
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg)
    cache = json.loads((run / evaluate.CACHE_FILE).read_text())
    teacher_hash = json.loads((run / "teacher" / "shrink.json").read_text())["content_hash"]
    assert any(teacher_hash in key for key in cache), cache.keys()


def test_wikitext2_runs_on_its_own_protocol_capped_and_cached_by_it(tiny_teacher: Path, tmp_path: Path,
                                                                     shared_data_dir: Path):
    """WikiText-2 takes eval.wikitext2 (non-overlapping, full windows), not the held-out sliding
    windows; a context past the model's 512 positions is capped, and the report says so; the
    perplexity cache is keyed by the protocol (a second run with another max_windows recomputes)."""
    from shrink.__main__ import compose, run as run_stage

    run = _tiny_run(tiny_teacher, tmp_path)
    off = ["eval.tasks.enabled=false", "eval.agreement.enabled=false", "eval.speed.enabled=false",
           "eval.load.enabled=false", "eval.plots=false"]
    windows = {}
    for max_windows in (1, 2):
        cfg = compose(["stage=eval", f"run={run}", f"cache_dir={tmp_path / 'cache'}", f"data_dir={shared_data_dir}",
                       *TINY, "eval.datasets=[wikitext2,heldout]", "eval.wikitext2.context=1024",
                       "eval.wikitext2.stride=1024", f"eval.wikitext2.max_windows={max_windows}", *off])
        run_stage(cfg)
        report = json.loads((run / "eval" / "report.json").read_text())
        details = report["details"]["teacher"]
        windows[max_windows] = details["ppl_wikitext2"]["windows"]
        assert details["ppl_wikitext2"]["protocol"] == {"context": 512, "stride": 512, "max_windows": max_windows,
                                                        "full_windows_only": True}
        assert details["ppl_wikitext2"]["tokens"] == 511 * max_windows  # each window's first token is context
        assert details["ppl_heldout"]["protocol"]["stride"] == 32
        notes = "\n".join(report["notes"])
        assert "eval.wikitext2.context=1024 is past the model's max_position_embeddings (512)" in notes
        assert "non-overlapping windows of 512 tokens, full windows only" in notes
        assert "NOT the project's fixed protocol" in notes
        assert all(r["ppl_wikitext2"] > 1.0 for r in report["rows"])
    assert windows == {1: 1, 2: 2}


def test_the_speculative_row_under_the_engines_measured_k_policy(tiny_teacher: Path, tmp_path: Path):
    """eval=gpu serves the speculative row with the engine's auto policy: the row says so, and its
    details keep what the policy chose."""
    run = _tiny_run(tiny_teacher, tmp_path)
    result = run_main("stage=eval", f"run={run}", *TINY, "eval.tasks.enabled=false", "eval.load.enabled=false",
                      "eval.agreement.enabled=false", "eval.speculative=true",
                      "eval.speculative_settings.num_speculative_tokens=3", "eval.speculative_settings.k_policy=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    name = "teacher+distill (speculative, k<=3, auto)"
    assert [r["artifact"] for r in report["rows"]][-1] == name
    row = report["rows"][-1]
    assert "engine_error" not in row, row.get("engine_error")
    assert row["decode_tok_s_b1"] > 0
    spec = report["details"][name]
    assert spec["engine_options"]["speculative_config"]["num_speculative_tokens_per_batch_size"] == "auto"
    policy = spec["spec_decode"]["policy"]
    assert policy["policy"] == "auto" and sum(policy["steps_by_k"]) > 0 and policy["costs"]["decode_s"]


def test_the_next_eval_resumes_after_the_rows_a_stopped_one_finished(tiny_teacher: Path, tmp_path: Path,
                                                                   monkeypatch):
    """The H200 reference eval of 2026-11-29 ran past a device call's time limit twice and started
    over each time. Every finished row is kept (with its details): the next eval measures only the
    rows still missing, the agreement of those against the teacher's reference included, and the
    report says which rows were resumed. Another setting measures everything again."""
    import shrink.stages.evaluate as evaluate
    from shrink.__main__ import compose, run as run_stage

    run = _tiny_run(tiny_teacher, tmp_path)
    real = evaluate._engine_measurements
    calls: list[str] = []

    def stop_at_the_second(art_dir, *args, **kwargs):
        calls.append(Path(art_dir).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("the machine went away")
        return real(art_dir, *args, **kwargs)

    monkeypatch.setattr(evaluate, "_engine_measurements", stop_at_the_second)
    keys = ["stage=eval", f"run={run}", f"cache_dir={tmp_path / 'cache'}", *TINY, "eval.tasks.enabled=false",
            "eval.load.enabled=false", "eval.speed.batch_sizes=[1]", "eval.speed.hf_baseline=false"]
    with pytest.raises(KeyboardInterrupt):
        run_stage(compose(keys))
    assert calls == ["teacher", "distill"]
    calls.clear()
    monkeypatch.setattr(evaluate, "_engine_measurements", lambda *a, **k: calls.append(Path(a[0]).name) or real(*a, **k))
    run_stage(compose(keys))
    assert calls == ["distill"]
    report = json.loads((run / "eval" / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    assert rows["teacher"]["decode_tok_s_b1"] > 0 and rows["distill"]["decode_tok_s_b1"] > 0
    assert rows["teacher"]["top1_agreement"] == 1.0 and 0.0 <= rows["distill"]["top1_agreement"] < 1.0
    assert "engine_speed" in report["details"]["teacher"]
    assert any(n.startswith("resumed: the rows of teacher ") for n in report["notes"])
    calls.clear()
    run_stage(compose([*keys, "eval.speed.new_tokens=9"]))  # another setting: nothing reused
    assert calls == ["teacher", "distill"]
