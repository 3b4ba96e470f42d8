"""Training checkpoints written atomically: model, optimizer, scheduler, RNG and step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.dirs import remove_marked_dir, replace_dir_atomically
from common.errors import ShrinkError

STATE_FILE = "trainer_state.json"
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's name for the first model's FSDP shards


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



def resume_note(ckpt_dir: Path, name: str) -> str | None:
    """resume=true with nothing to resume from: the line that says so (None when a checkpoint exists)."""
    if checkpoint_step(ckpt_dir) is None:
        return f"{name}: resume=true but no checkpoint in {ckpt_dir}; starting at step 0"
    return None


def saved_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The model tensors a checkpoint holds, with their (global) shapes: from `model.safetensors`
    (one process, DDP) or from the metadata of the sharded FSDP2 checkpoint (accelerate writes it
    with torch.distributed.checkpoint as {"model": state_dict}). None: no model in the checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    file = ckpt_dir / "model.safetensors"
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sharded = ckpt_dir / SHARDED_MODEL_DIR
    if (sharded / ".metadata").is_file():
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
        return {k.removeprefix("model."): tuple(m.size) for k, m in meta.items()
                if k.startswith("model.") and hasattr(m, "size")}
    return None


def check_checkpoint_fits(ckpt_dir: Path, model, settings: str) -> None:
    """resume=true: the checkpoint's model has this model's tensor names and shapes, else a ShrinkError
    naming the `settings` that decide the model's shape (a different student cannot be resumed)."""
    saved = saved_shapes(ckpt_dir) if checkpoint_step(ckpt_dir) is not None else None
    if saved is None:
        return
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied weights appear once
    # A sharded checkpoint names a tied weight under each of its names.
    every_name = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    unexpected = sorted(set(saved) - set(every_name))
    missing = sorted(set(ours) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(every_name) if saved[k] != every_name[k])
    if unexpected or missing or reshaped:
        example = (unexpected or missing or reshaped)[0]
        raise ShrinkError(f"resume=true: the checkpoint in {ckpt_dir} was written for another model "
                          f"({len(missing)} tensors missing, {len(unexpected)} unexpected, {len(reshaped)} "
                          f"of another shape, e.g. {example}); resume with the interrupted run's {settings}, "
                          f"or set resume=false to start over")
