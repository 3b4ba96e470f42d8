"""Nothing the user owns is replaced, two commands never share a run dir, and a single stage reads
the run's latest artifact in pipeline order (issue 11, findings 1, 4 and 10)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.dirs import dir_lock
from common.errors import ShrinkError
from shrink.artifacts import Artifact
from shrink.context import StageContext, check_free_space, prepare_run_dir
from support import run_cli, save_tiny_artifact
from test_cli import TINY, _one_line_error


def test_a_users_directory_named_like_a_stage_is_kept(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "R"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "notes.txt").write_text("x")
    shutil.copytree(tiny_teacher, run / "teacher")
    result = run_cli("stage=eval", f"run={run}", *TINY)
    _one_line_error(result, str(run / "eval"), "not written by shrink")
    assert (run / "eval" / "notes.txt").read_text() == "x"
    assert not (run / ".eval_cache.json").exists()  # refused before any work


def test_pipeline_refuses_before_any_work(tmp_path: Path):
    """`stage=pipeline run=.` in a repository with an `eval/` package must not touch it."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text("")
    result = run_cli("stage=pipeline", f"run={tmp_path}", *TINY)
    _one_line_error(result, str(tmp_path / "eval"))
    assert (tmp_path / "eval" / "__init__.py").exists()
    assert not (tmp_path / "teacher").exists()  # the import never started


def test_an_unmarked_checkpoint_dir_is_refused(tiny_teacher: Path, tmp_path: Path):
    (tmp_path / ".distill.ckpt").mkdir()
    (tmp_path / ".distill.ckpt" / "mine.txt").write_text("x")
    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", *TINY)
    _one_line_error(result, ".distill.ckpt")
    assert (tmp_path / ".distill.ckpt" / "mine.txt").exists()


def test_a_second_command_on_a_locked_run_dir_is_refused(tiny_teacher: Path, tmp_path: Path):
    shutil.copytree(tiny_teacher, tmp_path / "teacher")
    with dir_lock(tmp_path, "test"):
        result = run_cli("stage=eval", f"run={tmp_path}", *TINY)
    _one_line_error(result, "in use by another shrink process")
    assert not (tmp_path / "eval").exists()


def test_single_stage_reads_the_latest_artifact_in_pipeline_order(tmp_path: Path, capsys):
    save_tiny_artifact(tmp_path / "teacher")
    save_tiny_artifact(tmp_path / "prune", seed=1)
    save_tiny_artifact(tmp_path / "quantize", seed=2)  # after quantize's own place: never its input
    cfg = OmegaConf.create({"stage": {"name": "quantize"}, "device": "cpu", "seed": 0})
    ctx = StageContext(cfg, tmp_path)
    assert ctx.input.path == tmp_path / "prune"
    assert "quantize: input " + str(tmp_path / "prune") in capsys.readouterr().out
    cfg.stage.name = "distill"
    assert StageContext(cfg, tmp_path).input.path == tmp_path / "teacher"


def test_unwritable_run_dir_fails_before_work():
    # /proc refuses new entries even for root, like a read-only mount would.
    with pytest.raises(ShrinkError, match="not writable"):
        prepare_run_dir("/proc/shrink-run")


def test_full_disk_fails_before_work(tmp_path: Path, monkeypatch):
    teacher = Artifact.load(save_tiny_artifact(tmp_path / "teacher"))
    monkeypatch.setattr("shutil.disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ShrinkError, match="MiB free"):
        check_free_space(tmp_path, ["distill", "gqa"], teacher)
    check_free_space(tmp_path, ["eval"], teacher)  # eval writes no model


def test_a_damaged_input_is_refused_before_work(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run / "teacher")
    save_tiny_artifact(run / "prune", seed=1)
    weights = run / "prune" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, still a readable safetensors file: only the hash can tell
    weights.write_bytes(bytes(data))
    result = run_cli("stage=quantize", f"run={run}", *TINY)
    _one_line_error(result, str(run / "prune"), "damaged")
    assert not (run / "quantize").exists()


def test_cuda_without_a_gpu_fails_before_the_teacher_import(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    result = run_cli("stage=distill", f"run={tmp_path}", "device=cuda", *TINY)
    _one_line_error(result, "device=cuda")
    assert not (tmp_path / "teacher").exists()
