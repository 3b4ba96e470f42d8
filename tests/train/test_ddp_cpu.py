"""Data-parallel distillation through the real launcher: two CPU processes (torchrun, gloo) train the
same student as one process with twice the batch.

Rank r of n takes global micro-batch `step * n + r` (train/loop.py), so ranks 0 and 1 at batch 2
cover exactly the examples one process sees at batch 4, and DDP's gradient average over equal-size
ranks equals the token mean of the single process. The two runs must end on the same weights
(up to float summation order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from support import REPO

ARGS = ["stage=distill", "student=half_depth", "logging=none", "data=pydoc", "data.max_docs=30",
        "data.block_size=64", "distill.save_dtype=fp32", "distill.val_batches=1",
        "distill.max_steps=3", "distill.warmup_steps=1", "distill.lr=1e-3"]


def _run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHRINK_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_ddp_equals_one_process_with_twice_the_batch(tiny_teacher: Path, tmp_path: Path):
    from shrink.__main__ import main

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # The one-process reference runs in this process (`python -m shrink`'s main): the launch of two is
    # what is tested, and a third interpreter importing torch would only add its start-up.
    assert main([*ARGS, f"run={single}", f"input={tiny_teacher}", f"cache_dir={tmp_path / 'cache'}",
                 "distill.batch_size=4", "distill.checkpoint_every=0"]) == 0
    # With a checkpoint every step: all ranks write one checkpoint directory, one rank the artifact.
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
          "-m", "shrink", *ARGS, f"run={ddp}", f"input={tiny_teacher}", "distill.batch_size=2",
          "distill.checkpoint_every=1"], tmp_path)
    m_single = json.loads((single / "distill" / "shrink.json").read_text())["metrics"]
    m_ddp = json.loads((ddp / "distill" / "shrink.json").read_text())["metrics"]
    assert m_ddp["train_tokens"] == m_single["train_tokens"] == 3 * 4 * 64
    assert not list(ddp.glob(".*.tmp-*")) and not (ddp / ".distill.ckpt").exists()  # nothing left behind
    a = load_file(str(single / "distill" / "model.safetensors"))
    b = load_file(str(ddp / "distill" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - load_file(str(tiny_teacher / "model.safetensors")).get(k, a[k])).abs().max())
                for k in a if "layers.0." in k)
    assert moved > 1e-4  # training did change the weights, so equality below means something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
