"""Hydra's own flags: --cfg job|hydra|all, --info, and -m/--multirun sweeps with one run dir per job
(issue 11, conventions users expect), all keeping the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from support import run_cli
from test_cli import _one_line_error


def test_cfg_job_hydra_all(tmp_path: Path):
    job = run_cli("stage=eval", f"run={tmp_path}", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    parsed = yaml.safe_load(job.stdout)
    assert parsed["stage"]["name"] == "eval" and "hydra" not in parsed
    hydra = run_cli("stage=eval", "--cfg", "hydra")
    assert hydra.returncode == 0, hydra.stderr
    assert "hydra" in yaml.safe_load(hydra.stdout) and "stage" not in yaml.safe_load(hydra.stdout)
    both = yaml.safe_load(run_cli("stage=eval", "--cfg", "all").stdout)
    assert "hydra" in both and both["stage"]["name"] == "eval"
    assert not any(tmp_path.iterdir())  # printing runs nothing


def test_cfg_with_a_bad_choice_is_one_line():
    _one_line_error(run_cli("--cfg", "everything"), "--cfg", "job, hydra, all")
    _one_line_error(run_cli("stage=nope", "--cfg", "job"), "nope")


def test_info_shows_search_path_and_defaults():
    result = run_cli("stage=eval", "--info")
    assert result.returncode == 0, result.stderr
    assert "Config search path" in result.stdout and "Defaults List" in result.stdout
    defaults = run_cli("stage=eval", "--info", "defaults")
    assert defaults.returncode == 0 and "stage/eval" in defaults.stdout
    assert "Config search path" not in defaults.stdout


def test_multirun_runs_one_job_per_combination_in_its_own_run_dir(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("-m", "stage=import", f"run={tmp_path}", "logging=none", "teacher=custom",
                     f"teacher.source={tiny_teacher}", "teacher.dtype=fp32,bf16", "seed=0,1")
    assert result.returncode == 0, result.stderr[-2000:]
    dtypes = {}
    for job in range(4):
        meta = json.loads((tmp_path / str(job) / "teacher" / "shrink.json").read_text())
        dtypes[job] = (meta["config"]["teacher"]["dtype"], meta["seed"] if "seed" in meta else meta["config"]["seed"])
    assert sorted(dtypes.values()) == [("bf16", 0), ("bf16", 1), ("fp32", 0), ("fp32", 1)]
    assert result.stdout.count("multirun: job") == 4


def test_multirun_checks_every_job_before_running_any(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("--multirun", "stage=import", f"run={tmp_path / 'r'}", "logging=none", "teacher=custom",
                     f"teacher.source={tiny_teacher}", "distill.lr=1e-4,abc")
    _one_line_error(result, "distill.lr")
    assert not (tmp_path / "r").exists()


def test_a_sweep_without_multirun_is_one_line(tmp_path: Path):
    _one_line_error(run_cli("stage=eval", f"run={tmp_path}", "distill.lr=1e-4,3e-4"), "--multirun")
