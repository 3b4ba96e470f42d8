"""Training checkpoints written atomically: model, optimizer, scheduler, RNG and step."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from shrink.artifacts import replace_dir_atomically

STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, extra: dict | None = None) -> None:
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))
        replace_dir_atomically(tmp, ckpt_dir)
    except BaseException:
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
    if Path(ckpt_dir).exists():
        shutil.rmtree(ckpt_dir)
