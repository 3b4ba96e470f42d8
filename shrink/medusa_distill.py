"""`stage=distill distill=medusa`: Medusa heads (common/medusa.py) trained on the frozen teacher instead of a
student model (issue 14: a 4-layer drafter accepted 23% at k = 1, and on a launch-bound target every
drafter layer costs a sizeable share of a target step; a head reads the target's own last hidden state).

The data are the drafter preset's: the teacher's own samples, made with our engine and cached by lineage
(shrink/teacher_data.py); a `medusa.val_fraction` share of them is held out for the validation, which
replaces the perplexity gate (shrink/quality_gate.py skips a Medusa artifact): per head, top-1 agreement
with the teacher's argmax at its position, and the mean accepted length a greedy verify of heads
0 .. k - 1 would see (train/medusa.validate_heads), before and after training.

The artifact is the directory common/medusa.py defines (config.json, model.safetensors), the teacher's
tokenizer files and shrink.json (the teacher's content hash as input, the teacher data's lineage entry,
the settings), for `LLM(teacher, speculative_config={"method": "medusa", "model": RUN/distill,
"num_speculative_tokens": k})`."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from common.errors import SettingError, ShrinkError, config_section
from common.medusa import MedusaHeads, save_heads
from shrink.artifacts import Artifact, write_artifact
from shrink.config_check import MedusaSettings
from shrink.context import checkpoint_dir_name
from shrink.modeling import load_model, load_tokenizer, num_parameters, resolve_dtype
from shrink.teacher_data import TeacherDataSettings, teacher_generated_blocks
from train.config import TrainConfig, check_head_config
from train.data import load_packed, mix_generated, pack
from train.loop import LOG_FILE
from train.medusa import train_heads


def split_samples(samples: list[list[int]], val_fraction: float, seed: int = 0
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """(held-out, training) teacher samples: a seeded `val_fraction` share (at least one) is held out, drawn
    over the whole list (its corpus continuations come first and its instruction answers last), each part
    in its original order."""
    n_val = max(1, round(len(samples) * val_fraction))
    if n_val >= len(samples):
        raise SettingError("medusa.val_fraction", f"holds out {n_val} of {len(samples)} teacher samples, leaving "
                           "none to train on: raise data.teacher_generated.num_samples", sep=" ")
    held = set(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i in held], [s for i, s in enumerate(samples) if i not in held])


def save_medusa_artifact(dest: Path, heads: MedusaHeads, tokenizer: Any, *, dtype: torch.dtype = torch.float32,
                         config: dict | None = None, inputs: list[Artifact] | None = None,
                         metrics: dict | None = None, started: float | None = None) -> Artifact:
    """The heads (a copy cast to `dtype`, on the CPU) as common/medusa.py's directory, the teacher's tokenizer
    files beside them, and shrink.json (config, inputs, metrics), written atomically."""

    def save(tmp: Path) -> None:
        save_heads(copy.deepcopy(heads).to("cpu", dtype), tmp)
        tokenizer.save_pretrained(tmp)

    return write_artifact(dest, stage="distill", save=save, config=config, inputs=inputs, metrics=metrics,
                          started=started)


def distill_medusa(teacher_art: Artifact, settings: MedusaSettings, data: Any, tc: TrainConfig, *, dest: Path,
                   log_path: Path, device: torch.device, data_dir: Path | None = None, cache_dir: Path | None = None,
                   teacher_data: TeacherDataSettings | None = None, save_dtype: str = "fp32",
                   config: dict | None = None) -> Artifact:
    """Train Medusa heads on `teacher_art` (frozen) and save them at `dest`; `data` is the `data` config
    group of LM text (its prompts for the teacher's samples, or the text itself without teacher_data)."""
    started = time.time()
    block_size = int(data.block_size)
    with config_section("distill"):
        check_head_config(tc, settings.num_heads, block_size)  # before any work (the CLI checked it already)
    dtype = resolve_dtype(save_dtype)
    teacher = load_model(teacher_art, dtype="fp32", device=device)
    tokenizer = load_tokenizer(teacher_art)
    packed = load_packed(data, tokenizer, data_dir, cache_dir)
    train, val, source, val_source, info = packed.train, packed.val, packed.source, "held-out corpus blocks", {}
    if teacher_data is not None and teacher_data.ratio > 0:
        if cache_dir is None:
            raise ShrinkError("data.teacher_generated needs a cache directory (cache_dir=)")
        samples, info = teacher_generated_blocks(teacher_data, teacher_art, tokenizer, packed.train, cache_dir,
                                                 str(device))
        with config_section("distill"):
            held_out, kept = split_samples(samples, settings.val_fraction, teacher_data.seed)
        val = pack(held_out, block_size, tokenizer.eos_token_id)
        if val.shape[0] == 0:
            raise ShrinkError(f"distill.medusa.val_fraction: the {len(held_out)} held-out teacher samples fill no "
                              f"block of data.block_size={block_size} tokens: raise it or "
                              "data.teacher_generated.num_samples")
        train = mix_generated(train, kept, teacher_data.ratio, tokenizer.eos_token_id, teacher_data.seed)
        source = f"{source} + teacher-generated ({teacher_data.ratio:.0%} of blocks)"
        val_source = f"{len(held_out)} held-out teacher samples"
    hidden, vocab = int(teacher.config.hidden_size), int(teacher.config.vocab_size)
    heads = MedusaHeads(hidden, vocab, settings.num_heads, settings.num_layers)
    result = train_heads(heads, teacher, train, val, tc, device, log_path, name="distill")
    metrics = {**result, "num_heads": settings.num_heads, "num_layers": settings.num_layers,
               "params": num_parameters(heads), "teacher_params": num_parameters(teacher), "data_source": source,
               "val_source": val_source, "train_examples": int(train.shape[0]), "val_examples": int(val.shape[0]),
               "save_dtype": str(dtype).removeprefix("torch."), **info}

    art = save_medusa_artifact(dest, heads, tokenizer, dtype=dtype, config=config, inputs=[teacher_art],
                               metrics=metrics, started=started)
    print(f"distill: Medusa heads ({settings.num_heads} x {settings.num_layers} blocks) at {dest}; "
          f"metrics in {dest / 'shrink.json'}", flush=True)
    return art


def run_medusa(cfg: Any, ctx: Any, tc: TrainConfig) -> Artifact:
    """The distill stage's branch for a `distill.medusa` mapping (conf/distill/medusa.yaml)."""
    with config_section("distill"):
        settings = MedusaSettings.from_cfg(cfg.distill.medusa)
        if cfg.distill.get("token_frequencies"):
            raise SettingError("token_frequencies", "counts a draft model's vocabulary; Medusa heads draft over "
                               "the target's own LM head: leave it false", sep=" ")
    if cfg.data.get("task"):
        raise ShrinkError("distill.medusa trains on LM text (the teacher's samples), not on data.task")
    if bool(cfg.resume):
        raise ShrinkError("resume=true: Medusa heads train in one go (minutes), without checkpoints: run again "
                          "without resume")
    generated = cfg.data.get("teacher_generated")
    teacher_data = TeacherDataSettings.from_cfg(generated, int(cfg.seed)) if generated else None
    ckpt = ctx.run_dir / checkpoint_dir_name("distill")  # the distill stage's: its train log beside it
    return distill_medusa(ctx.input, settings, cfg.data, tc, dest=ctx.output_dir("distill"),
                          log_path=ckpt.parent / f"{ckpt.name}.{LOG_FILE}", device=ctx.device, data_dir=ctx.data_dir,
                          cache_dir=ctx.cache_dir, teacher_data=teacher_data, save_dtype=str(cfg.distill.save_dtype),
                          config=ctx.resolved_config("distill", "data"))
