"""Distillation across processes through the real launcher (`accelerate launch` with the repo's
configs, gloo on CPU processes): FSDP2 (teacher and student sharded) and DDP at 2 ranks follow one
process's loss curve at equal global batch, and a run that loses a rank resumes from its sharded
checkpoint onto the uninterrupted run's curve. FSDP2 with gradient accumulation (2 ranks x 2 micro-batches,
gradients not synchronised between them) follows the same curve.

Equal global batch: rank r of n takes global micro-batch `step * n + r` (train/loop.py), so 2 ranks
at batch 2 see exactly the 4 blocks one process sees at batch 4. Packed blocks have equal token
counts, so the mean of the ranks' mean losses (what is logged, and what DDP / FSDP's gradient
average optimises) is the single process's token mean. Everything is fp32: the curves agree up to
float summation order (TOLERANCE).

Every launch runs in its own process group under a timeout and is killed whole on expiry, so a rank
that fails or waits forever cannot hang the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO

TOLERANCE = dict(rtol=1e-5, atol=1e-6)         # losses and weights, 2 ranks vs 1 process
RESUME_TOLERANCE = dict(rtol=1e-6, atol=1e-7)  # resumed vs uninterrupted, same ranks
TIMEOUT_S = 300
STEPS, CKPT_EVERY, GLOBAL_BATCH = 8, 2, 4
ARGS = ["stage=distill", "student=half_depth", "logging=none", "data=pydoc", "data.max_docs=30",
        "data.block_size=64", "distill.save_dtype=fp32", "distill.val_batches=1", f"distill.max_steps={STEPS}",
        "distill.warmup_steps=1", "distill.lr=1e-3", "gates.enabled=false"]
CONFIGS = {"fsdp2": REPO / "conf" / "accelerate" / "fsdp.yaml", "ddp": REPO / "conf" / "accelerate" / "ddp.yaml"}
_ports = iter(range(29761, 29790))


def _launch(cmd: list[str], tmp_path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session; on timeout kill the whole group (launcher and every rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHRINK_CACHE_DIR": str(tmp_path.parent / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "WANDB_SILENT": "true", **(extra_env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... did not finish in {TIMEOUT_S} s (a rank hung):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _accelerate(kind: str, target: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[kind]),
            "--num_processes", "2", "--main_process_port", str(next(_ports)), *target]


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / ".distill.ckpt.train_log.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "distill" / "model.safetensors"))


def launched_runs(tiny_teacher: Path, tmp_path_factory):
    """Runs made once and compared by several tests: get(name) -> run dir; get.made: name -> (run
    dir, CompletedProcess of the launch). Names: single (one process at the global batch), fsdp2, ddp,
    fsdp2_accum. The single run is the reference, not what is tested: it runs in this process
    (`python -m shrink`'s main), sparing an interpreter's start-up; every launched run is a real launch."""
    made: dict = {}

    def get(name: str) -> Path:
        if name not in made:
            run = tmp_path_factory.mktemp(name) / "run"
            common = [*ARGS, f"run={run}", f"input={tiny_teacher}", f"distill.checkpoint_every={CKPT_EVERY}"]
            if name == "single":
                from shrink.__main__ import main

                assert main([*common, f"cache_dir={run.parent / 'cache'}", f"distill.batch_size={GLOBAL_BATCH}"]) == 0
                made[name] = (run, None)
                return run
            if name == "fsdp2_accum":  # 2 ranks x 2 micro-batches of 1: FSDP2 without gradient sync between
                cmd = _accelerate("fsdp2", ["-m", "shrink", *common, f"distill.batch_size={GLOBAL_BATCH // 4}",
                                            "distill.grad_accum=2"])
            else:
                cmd = _accelerate(name, ["-m", "shrink", *common, f"distill.batch_size={GLOBAL_BATCH // 2}"])
            made[name] = (run, _ok(_launch(cmd, run)))
        return made[name][0]

    get.made = made
    return get


@pytest.fixture(scope="module")
def runs(tiny_teacher: Path, tmp_path_factory):
    return launched_runs(tiny_teacher, tmp_path_factory)


@pytest.mark.parametrize("kind", ["fsdp2", "ddp", "fsdp2_accum"])
def test_two_ranks_follow_one_process_at_equal_global_batch(runs, kind: str, tiny_teacher: Path):
    single, launched = runs("single"), runs(kind)
    stdout = runs.made[kind][1].stdout
    # accelerate silently runs DDP on CPU processes unless told otherwise: check what really ran.
    assert f"distill: {'MULTI_CPU' if kind == 'ddp' else 'FSDP2'} over 2 processes on cpu" in stdout, stdout
    curve, curve_1 = _log(launched), _log(single)
    assert [r["step"] for r in curve] == [r["step"] for r in curve_1] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in curve]), torch.tensor([r["loss"] for r in curve_1]),
                               **TOLERANCE, check_dtype=False)
    m, m_1 = (json.loads((r / "distill" / "shrink.json").read_text())["metrics"] for r in (launched, single))
    assert m["train_tokens"] == m_1["train_tokens"] == STEPS * GLOBAL_BATCH * 64
    assert m["params"] == m_1["params"]  # the sharded student counted whole
    a, b = _weights(single), _weights(launched)
    assert a.keys() == b.keys()
    teacher = load_file(str(tiny_teacher / "model.safetensors"))
    moved = max(float((a[k] - teacher[k]).abs().max()) for k in a if k.startswith("model.layers.0."))
    assert moved > 1e-4  # training changed the weights, so the equality below means something
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TOLERANCE, msg=k)
    # One writer: the artifact complete, no checkpoint or temporary directory left behind.
    assert not list(launched.glob(".*.tmp-*")) and not (launched / ".distill.ckpt").exists()


def test_fsdp2_run_that_loses_a_rank_resumes_onto_the_same_curve(runs, tiny_teacher: Path, tmp_path: Path):
    straight = runs("fsdp2")
    run = tmp_path / "run"
    common = [*ARGS, f"run={run}", f"input={tiny_teacher}", f"distill.checkpoint_every={CKPT_EVERY}",
              f"distill.batch_size={GLOBAL_BATCH // 2}"]
    kill_at = 6  # rank 1 dies on reaching the step-6 checkpoint: steps 5-6 are lost, step 4's is on disk
    killed = _launch(_accelerate("fsdp2", [str(REPO / "tests" / "train" / "killed_rank.py"), *common]), run,
                     {"KILL_AT_STEP": str(kill_at)})
    assert killed.returncode != 0, "the launcher must report the lost rank"
    state = json.loads((run / ".distill.ckpt" / "trainer_state.json").read_text())
    assert state["step"] == kill_at - CKPT_EVERY
    assert (run / ".distill.ckpt" / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded, not gathered
    assert not (run / "distill").exists()

    resumed = _ok(_launch(_accelerate("fsdp2", ["-m", "shrink", *common, "resume=true"]), run))
    assert f"resumed from {run / '.distill.ckpt'} at step {kill_at - CKPT_EVERY}" in resumed.stdout, resumed.stdout
    curve, curve_straight = _log(run), _log(straight)
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))  # steps after the checkpoint logged once
    torch.testing.assert_close(torch.tensor([r["loss"] for r in curve]),
                               torch.tensor([r["loss"] for r in curve_straight]), **RESUME_TOLERANCE,
                               check_dtype=False)
    a, b = _weights(straight), _weights(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], **RESUME_TOLERANCE, msg=k)
    assert not list(run.glob(".*.tmp-*")) and not (run / ".distill.ckpt").exists()


def test_fsdp2_refuses_on_policy_sampling_before_training(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = _launch(_accelerate("fsdp2", ["-m", "shrink", *ARGS, f"run={run}", f"input={tiny_teacher}",
                                           "distill.batch_size=2", "distill.lmbda=0.5"]), tmp_path)
    assert result.returncode != 0
    assert "error: distill.lmbda (on-policy / sequence-level sampling) needs DDP" in result.stderr, \
        result.stderr[-2000:]
    assert not (run / "distill").exists()


def test_only_distill_runs_as_several_processes(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = _launch(_accelerate("ddp", ["-m", "shrink", "stage=prune", f"run={run}", f"input={tiny_teacher}",
                                         "logging=none"]), tmp_path)
    assert result.returncode != 0
    assert "error: stage=prune was launched as 2 processes, but only stage=distill trains across processes" \
        in result.stderr, result.stderr[-2000:]
    assert not (run / "prune").exists()


def test_rank_0_refused_by_the_run_lock_ends_the_waiting_rank(tiny_teacher: Path, tmp_path: Path):
    """Rank 0 cannot take the run directory's lock (another command holds it) while rank 1 waits for
    its checks: the launch must end, with rank 0's error, and nothing written."""
    from common.dirs import dir_lock

    run = tmp_path / "run"
    run.mkdir()
    with dir_lock(run, "the test's hold"):
        result = _launch(_accelerate("fsdp2", ["-m", "shrink", *ARGS, f"run={run}", f"input={tiny_teacher}",
                                               "distill.batch_size=2"]), tmp_path)
    assert result.returncode != 0
    assert f"error: run={run} is in use by another shrink process (pid {os.getpid()})" in result.stderr, \
        result.stderr[-2000:]
    assert not (run / "distill").exists() and not (run / ".distill.ckpt").exists()
