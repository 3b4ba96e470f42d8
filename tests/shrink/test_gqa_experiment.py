"""experiments/gqa.py --quick runs end to end on a CPU on a tiny model and writes its results; with
--teacher-samples it uptrains on the corpus mixed with a verified cache entry of the model's samples."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from common.errors import ShrinkError
from support import load_experiment, save_tiny_artifact
from test_gqa_reference import one_thread  # noqa: F401


def load_driver():
    return load_experiment("gqa")


def test_quick_experiment_runs_end_to_end(tmp_path):
    from pydoc_data.topics import topics

    model = save_tiny_artifact(tmp_path / "tiny", seed=2, hidden_size=48, num_attention_heads=6,
                               num_key_value_heads=3, num_hidden_layers=2)
    wiki = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_bytes("\r\n".join(topics["assignment"].splitlines()[:60]).encode())
    out = tmp_path / "out"
    data = load_driver().main(["--model", str(model), "--data-dir", str(wiki.parents[1]), "--out", str(out),
                               "--tokens", "1024", "--quick", "--device", "cpu"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == data["models"]
    m = saved["models"]["tiny"]
    assert math.isfinite(m["ppl_before"])
    assert list(m["budgets"]) == ["1024"] and "teacher_data" not in m["budgets"]["1024"]
    for init in ("mean", "first", "random"):
        row = m["budgets"]["1024"][init]
        assert row["train_tokens"] == 1024  # 4 steps x 4 blocks x 64 tokens, the same for every init
        assert math.isfinite(row["converted"]) and math.isfinite(row["uptrained"])
        assert (out / f"tiny-{init}.train_log.jsonl").is_file()
    assert m["kv"]["before"]["kv_heads"] == 3 and m["kv"]["after"]["kv_heads"] == 1
    table = (out / "results.md").read_text()
    assert "| tiny | random | 1024 |" in table and "KV bytes/token" in table
    assert "uptraining data: pydoc only" in table


def tiny_setup(tmp_path):
    """The tiny model, a WikiText-2 stand-in, and a cache entry of the model's samples (a fake generator:
    the entry is what teacher_samples writes, as experiments/distill.py --teacher-generated does)."""
    from pydoc_data.topics import topics

    from shrink.artifacts import Artifact
    from shrink.teacher_data import TeacherDataSettings, teacher_samples

    model = save_tiny_artifact(tmp_path / "tiny", seed=2, hidden_size=48, num_attention_heads=6,
                               num_key_value_heads=3, num_hidden_layers=2)
    wiki = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_bytes("\r\n".join(topics["assignment"].splitlines()[:60]).encode())
    s = TeacherDataSettings(ratio=0.5, num_samples=12, max_tokens=40, prefix_tokens=8, instructions=None,
                            instruction_field="text", instruction_fraction=0.0)
    prompts = [[5 + i] * 8 for i in range(12)]

    def generate(teacher, prompts, settings, device):
        return [[20 + i % 7] * settings.max_tokens for i in range(len(prompts))]

    _, entry = teacher_samples(Artifact.load(model), prompts, s, tmp_path / "cache", generate=generate)
    base = ["--model", str(model), "--data-dir", str(wiki.parents[1]), "--quick", "--device", "cpu",
            "--inits", "mean"]
    return model, entry, base


def test_teacher_samples_are_mixed_into_each_budget_and_recorded(tmp_path):
    """--teacher-samples with several --tokens: each budget trains on the corpus mixed with the entry's
    samples at the ratio (a row per budget), and results.json/md name the entry, its lineage and the mix."""
    _, entry, base = tiny_setup(tmp_path)
    out = tmp_path / "out"
    data = load_driver().main([*base, "--out", str(out), "--tokens", "512", "1024", "--teacher-samples", str(entry),
                               "--teacher-ratio", "0.25"])
    td = data["settings"]["teacher_data"]
    assert td["entry"] == str(entry.resolve()) and td["ratio"] == 0.25 and td["samples"] == 12
    assert td["lineage"] == json.loads((entry / "lineage.json").read_text())
    budgets = data["models"]["tiny"]["budgets"]
    assert list(budgets) == ["512", "1024"]
    for budget, steps in (("512", 2), ("1024", 4)):
        mix = budgets[budget]["teacher_data"]
        assert mix["generated_blocks"] == round(0.25 * mix["blocks"]) > 0
        assert mix["generated_blocks_available"] == (12 * (8 + 40 + 1)) // 64
        assert budgets[budget]["mean"]["train_tokens"] == steps * 4 * 64
        assert math.isfinite(budgets[budget]["mean"]["uptrained"])
        assert (out / f"tiny-mean-{budget}.train_log.jsonl").is_file()
    table = (out / "results.md").read_text()
    assert "| tiny | mean | 512 |" in table and "| tiny | mean | 1024 |" in table
    assert f"mixed with 12 teacher samples of {entry.resolve()}" in table and "25% of the training blocks" in table
    assert json.loads((out / "results.json").read_text())["models"] == data["models"]


def test_samples_of_another_model_or_a_damaged_entry_are_refused_before_training(tmp_path):
    from shrink.teacher_data import DATA_FILE

    _, entry, base = tiny_setup(tmp_path)
    other = save_tiny_artifact(tmp_path / "other", seed=3, hidden_size=48, num_attention_heads=6,
                               num_key_value_heads=3, num_hidden_layers=2)
    driver = load_driver()
    out = tmp_path / "out"
    wrong = [*base[:1], str(other), *base[2:]]
    named = f"{re.escape(str(entry))} was generated by a teacher of content hash .* not by {re.escape(str(other))}"
    with pytest.raises(ShrinkError, match=named):
        driver.main([*wrong, "--out", str(out), "--tokens", "256", "--teacher-samples", str(entry)])
    damaged = tmp_path / "damaged"
    shutil.copytree(entry, damaged)
    (damaged / DATA_FILE).unlink()
    with pytest.raises(ShrinkError, match=f"{re.escape(str(damaged))}: samples.pt is missing"):
        driver.main([*base, "--out", str(out), "--tokens", "256", "--teacher-samples", str(damaged)])
    assert not out.exists()  # refused before anything was written or trained
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            driver.parse_args([*base, "--out", str(out), "--tokens", "256", "--teacher-ratio", bad])
