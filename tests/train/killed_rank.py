"""`python -m shrink ...` whose rank 1 kills itself (SIGKILL: no cleanup, no exception) on reaching
the checkpoint of step $KILL_AT_STEP, before writing it: a rank lost mid-run. Run by the launcher as a
script (tests/train/test_distributed_cpu.py); the repo root must be on PYTHONPATH."""

from __future__ import annotations

import os
import signal

import train.loop
from shrink.__main__ import cli

_save = train.loop.save_checkpoint


def _save_or_die(accelerator, ckpt_dir, step, extra=None):
    if step == int(os.environ["KILL_AT_STEP"]) and accelerator.process_index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _save(accelerator, ckpt_dir, step, extra)


train.loop.save_checkpoint = _save_or_die

if __name__ == "__main__":
    cli()
