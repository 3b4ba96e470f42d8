"""Training checkpoints written atomically: model, optimizer, scheduler, RNG and step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.dirs import check_replaceable, remove_marked_dir, replace_dir_atomically

STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, extra: dict | None = None) -> None:
    """Every rank writes its part (accelerate saves the model once, RNG states per rank) into one
    temporary directory, named by step so all ranks agree on it; the main process then moves it into
    place in one rename."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-step{step}"
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))
            replace_dir_atomically(tmp, ckpt_dir, STATE_FILE)
        accelerator.wait_for_everyone()
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_step(ckpt_dir: Path) -> int | None:
    state = Path(ckpt_dir) / STATE_FILE
    if not state.is_file():
        return None
    return int(json.loads(state.read_text())["step"])


def load_checkpoint(accelerator, ckpt_dir: Path) -> dict:
    accelerator.load_state(str(ckpt_dir))
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def remove_checkpoint(ckpt_dir: Path) -> None:
    remove_marked_dir(ckpt_dir, STATE_FILE)


def check_checkpoint_location(ckpt_dir: Path) -> None:
    """Before any work: the checkpoint path is free or one of our checkpoints."""
    check_replaceable(ckpt_dir, STATE_FILE)
