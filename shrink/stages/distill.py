"""stage=distill: initialise a student from the teacher and train it by logit distillation."""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig, OmegaConf

from shrink.artifacts import Artifact
from shrink.context import StageContext
from shrink.errors import ShrinkError
from shrink.modeling import load_model, load_tokenizer, num_parameters, save_model_artifact
from shrink.stages import register_stage
from shrink.stages.import_model import cache_dir
from shrink.tracking import make_tracker
from train.checkpoint import remove_checkpoint
from train.data import load_packed
from train.loop import TrainConfig, train_distill
from train.student_init import parse_keep_layers, student_from_teacher

CKPT_DIR = ".distill.ckpt"


def student_layers(cfg: DictConfig, n_teacher_layers: int) -> list[int]:
    """The teacher layers the student keeps; checked from config.json alone, before any work."""
    init = str(cfg.student.init)
    if init != "teacher_layers":
        raise ShrinkError(f"student.init={init!r} is not supported (use teacher_layers)")
    spec = cfg.student.keep_layers
    return parse_keep_layers(OmegaConf.to_object(spec) if OmegaConf.is_config(spec) else spec, n_teacher_layers)


@register_stage("distill")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    teacher_art = ctx.input
    device = ctx.device
    keep = student_layers(cfg, int(json.loads((teacher_art.path / "config.json").read_text())["num_hidden_layers"]))
    # Master weights in fp32; on a GPU accelerate runs the forward in bf16 autocast.
    teacher = load_model(teacher_art, dtype="fp32", device=device)
    tokenizer = load_tokenizer(teacher_art)
    student = student_from_teacher(teacher, keep)
    teacher.requires_grad_(False)
    data = load_packed(cfg.data, tokenizer, cfg.get("data_dir"), cache_dir(cfg))
    tc = TrainConfig.from_cfg(cfg.distill, seed=int(cfg.seed), block_size=data.train.shape[1])
    config = ctx.resolved_config("distill", "student", "data")
    tracker = make_tracker(cfg.logging, ctx.run_dir, "distill", config)
    try:
        result = train_distill(student, teacher, data.train, data.val, tc, ctx.run_dir / CKPT_DIR,
                               resume=bool(cfg.resume), tracker=tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    metrics = {**result["metrics"], "params": num_parameters(result["model"]),
               "teacher_params": num_parameters(teacher), "data_source": data.source,
               "train_blocks": int(data.train.shape[0]), "val_blocks": int(data.val.shape[0])}
    artifact = save_model_artifact(ctx.output_dir("distill"), result["model"], tokenizer, stage="distill",
                                   config=config, inputs=[teacher_art], metrics=metrics, started=started,
                                   dtype=str(cfg.distill.save_dtype))
    remove_checkpoint(ctx.run_dir / CKPT_DIR)  # only once the artifact is safely in place
    return artifact
