"""The CLI end to end on a tiny model, and its one-line errors for bad configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support import run_cli, run_main

TINY = ["logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64", "eval.context=64",
        "eval.stride=32", "eval.max_windows=4", "eval.datasets=[heldout]"]


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_whole_pipeline_on_tiny_model(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    calib = ["num_samples=4", "seq_len=32", "batch_size=2"]
    result = run_cli("stage=pipeline", f"run={run}", "teacher=custom", f"teacher.source={tiny_teacher}",
                     "teacher.dtype=fp32", "student.keep_layers=every:2", "distill.max_steps=4",
                     "distill.batch_size=2", "distill.checkpoint_every=2", "distill.save_dtype=fp32",
                     "gqa.tokens=256", "gqa.train.batch_size=2", "gqa.save_dtype=fp32",
                     *[f"prune.calibration.{c}" for c in calib], *[f"quantize.calibration.{c}" for c in calib],
                     "quantize.group_size=32", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    distill_meta = json.loads((run / "distill" / "shrink.json").read_text())
    assert distill_meta["stage"] == "distill"
    assert distill_meta["inputs"][0]["path"] == str((run / "teacher").resolve())
    assert distill_meta["metrics"]["steps"] == 4
    assert json.loads((run / "distill" / "config.json").read_text())["num_hidden_layers"] == 2
    report = json.loads((run / "eval" / "report.json").read_text())
    assert [r["artifact"] for r in report["rows"]] == ["teacher", "distill", "gqa", "prune", "quantize"]
    lineage = json.loads((run / "quantize" / "shrink.json").read_text())["inputs"][0]["path"]
    assert lineage == str((run / "prune").resolve())
    assert json.loads((run / "gqa" / "config.json").read_text())["num_key_value_heads"] == 1
    assert all(r["ppl_heldout"] > 1.0 for r in report["rows"])
    kv = {r["artifact"]: r["kv_bytes_per_token"] for r in report["rows"]}
    assert kv["gqa"] == kv["distill"] // 2  # 2 -> 1 KV heads halves the cache
    assert (run / "eval" / "report.md").read_text().count("| teacher |") == 1
    assert "report at" in result.stdout
    assert not (run / ".distill.ckpt").exists()  # removed once the artifact is in place


def test_main_in_process_answers_as_the_command(tmp_path: Path):
    """support.run_main (the stage tests that read artifacts run the command's main() in process) gives
    the exit status and output of `python -m shrink` itself: usage, and a one-line error."""
    for args in (["--help"], ["stage=nope", f"run={tmp_path}"], ["stage=eval", f"run={tmp_path}", "distill.lr=abc"]):
        command, in_process = run_cli(*args), run_main(*args)
        assert (in_process.returncode, in_process.stdout, in_process.stderr) == (
            command.returncode, command.stdout, command.stderr), args


def test_unknown_stage_fails_in_one_line(tmp_path: Path):
    _one_line_error(run_cli("stage=nope", f"run={tmp_path}"), "stage", "nope")


def test_unknown_key_fails_in_one_line(tmp_path: Path):
    _one_line_error(run_cli("stage=eval", f"run={tmp_path}", "distill.learning_rate=1"), "learning_rate")


def test_missing_required_value_names_the_key(tmp_path: Path):
    _one_line_error(run_cli("stage=import", f"run={tmp_path}", "teacher=custom"), "teacher.source")


def test_bad_value_is_a_one_line_error(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student.keep_layers=every:0", *TINY)
    _one_line_error(result, "student.keep_layers")


def test_missing_input_artifact_is_named(tmp_path: Path):
    _one_line_error(run_cli("stage=distill", f"run={tmp_path}", f"input={tmp_path}/absent", *TINY), "absent")


@pytest.mark.parametrize("override,needle", [
    ("distill.lr=abc", "distill.lr"), ("distill.max_steps=2.7", "distill.max_steps"),
    ("data.block_size=abc", "data.block_size"), ("distill.lr=nan", "distill.lr"),
    ("device=gpu", "device=gpu"), ("gqa.train.lr=inf", "gqa.train.lr"), ("resume=maybe", "resume"),
    ("eval.max_windows=0", "eval.max_windows"), ("data.val_fraction=1.5", "data.val_fraction"),
])
def test_bad_values_fail_at_composition_in_one_line(override: str, needle: str, tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli("stage=distill", f"run={run}", *TINY, override, timeout=120)
    _one_line_error(result, needle)
    assert not run.exists()  # nothing started: the run dir is not even created


def test_run_that_is_a_file_is_refused(tmp_path: Path):
    (tmp_path / "f").write_text("mine")
    _one_line_error(run_cli("stage=eval", f"run={tmp_path / 'f'}", *TINY), "is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_input_with_truncated_weights_is_refused_before_work(tiny_teacher: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    result = run_cli("stage=distill", f"run={tmp_path / 'run'}", f"input={broken}", *TINY)
    _one_line_error(result, "model.safetensors", "truncated")


def test_input_without_config_json_is_named(tiny_teacher: Path, tmp_path: Path):
    broken = tmp_path / "noconfig"
    shutil.copytree(tiny_teacher, broken)
    (broken / "config.json").unlink()
    result = run_cli("stage=gqa", f"run={tmp_path / 'run'}", f"input={broken}", *TINY)
    _one_line_error(result, "config.json", str(broken))
