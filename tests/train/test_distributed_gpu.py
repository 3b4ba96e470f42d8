"""test_distributed_cpu.py's distributed distillation on two GPUs: NCCL, one process per GPU, bf16
autocast (what a user runs). FSDP2 and DDP at 2 ranks follow one GPU's loss curve at equal global batch
within bf16 noise, and an FSDP2 run that loses a rank resumes from its sharded checkpoint onto the
uninterrupted run's curve (same ranks, same kernels: much tighter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from support import REPO
from test_distributed_cpu import ARGS, CKPT_EVERY, GLOBAL_BATCH, STEPS, _accelerate, _launch, _log, _ok, _weights, \
    launched_runs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

# bf16 autocast: one GPU at batch 4 and two at batch 2 run their matmuls at other shapes, so other
# kernels and summation orders; the curves agree to bf16 rounding, not to fp32's.
CURVE_RTOL = 1e-2
RESUME_RTOL = 1e-4


@pytest.fixture(scope="module")
def gpu_runs(tiny_teacher: Path, tmp_path_factory):
    return launched_runs(tiny_teacher, tmp_path_factory)  # device=auto: the launcher's GPU per rank


def _losses(run: Path) -> torch.Tensor:
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    return torch.tensor([r["loss"] for r in log], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_two_gpus_follow_one_gpu_at_equal_global_batch(gpu_runs, kind: str, tiny_teacher: Path):
    single, launched = gpu_runs("single"), gpu_runs(kind)
    stdout = gpu_runs.made[kind][1].stdout
    assert re.search(rf"distill: {'MULTI_GPU' if kind == 'ddp' else 'FSDP2'} over 2 processes on cuda", stdout), stdout
    a, b = _losses(single), _losses(launched)
    assert float(a[0] - a[-1]) > 0.05  # the run learns: agreement of the curves means something
    rel = ((b - a).abs() / a.abs()).tolist()
    assert max(rel) < CURVE_RTOL, f"per-step relative loss difference {kind} vs one GPU: {rel}"
    w1, w2 = _weights(single), _weights(launched)
    assert w1.keys() == w2.keys()
    for k in w1:  # within a few bf16 ulps of the weights' scale
        scale = float(w1[k].float().abs().max())
        assert float((w2[k].float() - w1[k].float()).abs().max()) <= 2e-2 * scale + 1e-4, k


def test_fsdp2_on_two_gpus_resumes_onto_the_same_curve(gpu_runs, tiny_teacher: Path, tmp_path: Path):
    straight = gpu_runs("fsdp2")
    run = tmp_path / "run"
    common = [*ARGS, f"run={run}", f"input={tiny_teacher}", f"distill.checkpoint_every={CKPT_EVERY}",
              f"distill.batch_size={GLOBAL_BATCH // 2}"]
    kill_at = 6
    killed = _launch(_accelerate("fsdp2", [str(REPO / "tests" / "train" / "killed_rank.py"), *common]), run,
                     {"KILL_AT_STEP": str(kill_at)})
    assert killed.returncode != 0, "the launcher must report the lost rank"
    assert (run / ".distill.ckpt" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    resumed = _ok(_launch(_accelerate("fsdp2", ["-m", "shrink", *common, "resume=true"]), run))
    assert f"resumed from {run / '.distill.ckpt'} at step {kill_at - CKPT_EVERY}" in resumed.stdout, resumed.stdout
    a, b = _losses(straight), _losses(run)
    rel = ((b - a).abs() / a.abs()).tolist()
    assert max(rel) < RESUME_RTOL, f"per-step relative loss difference, resumed vs straight: {rel}"
    assert not (run / ".distill.ckpt").exists()
