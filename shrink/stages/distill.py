"""stage=distill: initialise a student (from the teacher by depth/width, from a config, or a
pretrained model with the teacher's vocabulary) and train it by distillation: logit losses,
intermediate layers, on-policy (GKD) or sequence-level KD on LM text, or Distilling Step-by-Step
rationale multi-task training on a reasoning task (data.task=cqa|svamp|gsm8k)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from shrink.artifacts import Artifact
from shrink.context import StageContext, checkpoint_dir_name
from common.errors import ShrinkError
from shrink.modeling import load_model, load_tokenizer, num_parameters, save_model_artifact
from shrink.stages import register_stage
from shrink.stages.import_model import cache_dir
from shrink.teacher_data import teacher_generated_blocks
from shrink.tracking import make_tracker
from train.checkpoint import check_checkpoint_fits, remove_checkpoint, resume_note
from train.config import TrainConfig
from train.data import data_dir, load_packed, mix_generated
from train.layer_distill import parse_layer_map
from train.loop import train_distill
from train.student_init import (check_same_vocab, needs_importance, parse_keep_layers, prune_width,
                                student_from_config, student_from_teacher)

CKPT_DIR = checkpoint_dir_name("distill")
INITS = ("teacher_layers", "config", "pretrained")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def student_layers(cfg: DictConfig, n_teacher_layers: int, scores: list[float] | None = None,
                   spec: Any = None) -> list[int] | None:
    """The teacher layers the student keeps (None unless init=teacher_layers); checked from
    config.json alone before any work (importance:n is checked for range only until scores exist)."""
    init = str(cfg.student.init)
    if init not in INITS:
        raise ShrinkError(f"student.init={init!r}: expected one of {', '.join(INITS)}")
    if init != "teacher_layers":
        return None
    spec = _plain(cfg.student.keep_layers) if spec is None else spec
    if spec == "all":
        return list(range(n_teacher_layers))
    if needs_importance(spec) and scores is None:
        n = parse_keep_layers(f"first:{spec.split(':', 1)[1]}", n_teacher_layers)  # range check only
        return list(range(len(n)))
    return parse_keep_layers(spec, n_teacher_layers, scores)


def calibration_blocks(cfg: DictConfig, tokenizer: Any, n_blocks: int) -> torch.Tensor:
    """Token blocks for measuring importance: the start of the LM training data."""
    data_cfg = cfg.data if not cfg.data.get("task") else OmegaConf.create(
        {"source": "auto", "block_size": 256, "val_fraction": 0.02, "max_docs": 2000, "seed": 0, "text_field": "text"})
    data = load_packed(data_cfg, tokenizer, cfg.get("data_dir"), cache_dir(cfg))
    return data.train[:n_blocks]


def build_student(cfg: DictConfig, teacher: torch.nn.Module, tokenizer: Any, device: torch.device
                  ) -> tuple[torch.nn.Module, list[int] | None, dict]:
    """(student, kept teacher layers or None, metrics about the choice)."""
    s = cfg.student
    init = str(s.init)
    n_teacher = teacher.config.num_hidden_layers
    info: dict[str, Any] = {"student_init": init}
    if init == "config":
        return student_from_config(teacher.config, dict(_plain(s.get("config")) or {})).to(device), None, info
    if init == "pretrained":
        if not s.get("path"):
            raise ShrinkError("student.init=pretrained needs student.path")
        student = load_model(Path(str(s.path)), dtype="fp32", device=device).train()
        check_same_vocab(tokenizer, load_tokenizer(Path(str(s.path))), teacher.config.vocab_size,
                         student.config.vocab_size)
        return student.requires_grad_(True), None, info
    spec = _plain(s.keep_layers)
    width = dict(_plain(s.get("width")) or {})
    shape = budget_shape(cfg, teacher.config)
    if shape is not None:  # student by budget: the depth or width that meets it
        by = shape["by"]
        info["budget"] = {"target_params": int(s.target_params), **shape}
        spec = f"importance:{shape['layers']}" if by == "depth" else "all"
        if by == "width":
            width["intermediate_size"] = shape["intermediate_size"]
    calib = None
    if needs_importance(spec) or (width.get("hidden_size") or width.get("intermediate_size")):
        calib = calibration_blocks(cfg, tokenizer, int(s.get("calib_blocks", 16)))
    scores = None
    if needs_importance(spec):
        from train.importance import layer_importance

        scores = layer_importance(teacher, calib, str(s.get("importance", "bi")))
        info["layer_importance"] = scores
    keep = student_layers(cfg, n_teacher, scores, spec)
    info["kept_layers"] = keep
    student = student_from_teacher(teacher, keep)
    if width.get("hidden_size") or width.get("intermediate_size"):
        from train.importance import channel_importance

        imp = channel_importance(student, calib) if str(width.get("importance", "activation")) == "activation" else None
        student = prune_width(student, width.get("hidden_size"), width.get("intermediate_size"), imp)
        info["width"] = {k: width.get(k) for k in ("hidden_size", "intermediate_size")}
    return student, keep, info


def task_data(cfg: DictConfig, teacher: torch.nn.Module, tokenizer: Any):
    """(train data, val data, evaluate(model) -> metrics) for data.task."""
    from eval.tasks import get_task, task_accuracy
    from train.rationale import MultiTaskExamples, few_shot_prompt, palm_rationales, teacher_rationales

    d = cfg.data
    task = get_task(str(d.task))
    shared = data_dir(cfg.get("data_dir"))
    if shared is None:
        raise ShrinkError("data.task needs the shared data (set data_dir= or SHRINK_DATA_DIR)")
    train = task.load(shared, "train")
    source = str(d.get("rationale", "none"))
    if source == "palm":
        rationales: list[str | None] = list(palm_rationales(shared, task.name, "train"))
    elif source == "none":
        rationales = [None] * len(train)
    elif source == "teacher":
        tr = d.teacher_rationale
        shots_from = palm_rationales(shared, task.name, "train")
        shots = few_shot_prompt(list(zip(train, shots_from))[: int(tr.shots)])
        limit = d.get("max_train")
        subset = train[: int(limit)] if limit else train
        rationales = list(teacher_rationales(teacher, tokenizer, subset, shots, cache_dir(cfg),
                                             str(teacher.config._name_or_path or "teacher"),
                                             int(tr.max_new_tokens), int(tr.batch_size)))
    else:
        if source not in train[0].explanation:
            raise ShrinkError(f"data.rationale={source!r}: expected palm, teacher, none or a column of "
                              f"{task.name} ({', '.join(train[0].explanation) or 'none'})")
        rationales = [ex.explanation.get(source) for ex in train]
    pairs = list(zip(train, rationales))
    if d.get("max_train"):
        pairs = pairs[: int(d.max_train)]
    n_val = max(1, int(len(pairs) * float(d.get("val_fraction", 0.02))))
    alpha, max_len = float(d.alpha), int(d.max_len)
    train_data = MultiTaskExamples(pairs[n_val:], tokenizer, alpha, max_len)
    val_data = MultiTaskExamples(pairs[:n_val], tokenizer, alpha, max_len)
    test = task.load(shared, str(d.get("eval_split", "test")))
    if d.get("max_eval"):
        test = test[: int(d.max_eval)]

    def evaluate(model: torch.nn.Module) -> dict:
        result = task_accuracy(model, tokenizer, task, test, int(d.get("eval_batch_size", 64)))
        print(f"distill: {task.name} {d.get('eval_split', 'test')} accuracy {result['accuracy']:.4f} "
              f"({result['n']} examples)")
        return {f"{task.name}_accuracy": result["accuracy"], f"{task.name}_eval_n": result["n"]}

    return train_data, val_data, evaluate


def budget_shape(cfg: DictConfig, teacher_config: Any) -> dict | None:
    """`student.target_params`: the student shape that meets it (None: no budget set)."""
    if not cfg.student.get("target_params"):
        return None
    from train.student_init import shape_for_budget

    by = str(cfg.student.get("budget_by", "depth"))
    return {"by": by, **shape_for_budget(teacher_config, int(cfg.student.target_params), by)}


@register_stage("distill")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    teacher_art = ctx.input
    device = ctx.device
    n_teacher = int(json.loads((teacher_art.path / "config.json").read_text())["num_hidden_layers"])
    if cfg.student.get("target_params"):  # the budget replaces keep_layers; check it before loading anything
        from transformers import AutoConfig

        budget_shape(cfg, AutoConfig.from_pretrained(teacher_art.path))
    else:
        student_layers(cfg, n_teacher)  # fail on a bad spec before loading anything
    # Master weights in fp32; on a GPU accelerate runs the forward in bf16 autocast.
    teacher = load_model(teacher_art, dtype="fp32", device=device)
    tokenizer = load_tokenizer(teacher_art)
    student, keep, init_info = build_student(cfg, teacher, tokenizer, device)
    ckpt_dir = ctx.run_dir / CKPT_DIR
    if cfg.resume:
        if not cfg.distill.get("lora"):  # LoRA checkpoints name the wrapped modules
            check_checkpoint_fits(ckpt_dir, student, "student.* settings (student.keep_layers, student.width, ...)")
        print(resume_note(ckpt_dir, "distill") or f"distill: resuming from {ckpt_dir}")
    teacher.requires_grad_(False)
    evaluate, generated = None, None
    if cfg.data.get("task"):
        train, val, evaluate = task_data(cfg, teacher, tokenizer)
        block_size = int(cfg.data.max_len)
        source = f"task:{cfg.data.task} rationale={cfg.data.get('rationale', 'none')}"
        n_train, n_val = len(train), len(val)
    else:
        data = load_packed(cfg.data, tokenizer, cfg.get("data_dir"), cache_dir(cfg))
        train, val, block_size, source = data.train, data.val, data.train.shape[1], data.source
        n_train, n_val = int(data.train.shape[0]), int(data.val.shape[0])
        generated = teacher_generated_blocks(cfg, teacher_art, tokenizer, data.train, cache_dir(cfg), str(device))
        if generated is not None:
            samples, gen_info = generated
            train = mix_generated(train, samples, gen_info["teacher_data_ratio"], tokenizer.eos_token_id, int(cfg.seed))
            source = f"{source} + teacher-generated ({gen_info['teacher_data_ratio']:.0%} of blocks)"
    tc = TrainConfig.from_cfg(cfg.distill, seed=int(cfg.seed), block_size=block_size)
    tc.layer_map = parse_layer_map(_plain(cfg.distill.get("layer_map")), student.config.num_hidden_layers,
                                   n_teacher, keep)
    if tc.layer_map and not tc.layer_weight:
        raise ShrinkError("distill.layer_map is set but distill.layer_weight is 0")
    config = ctx.resolved_config("distill", "student", "data")
    tracker = make_tracker(cfg.logging, ctx.run_dir, "distill", config)
    try:
        result = train_distill(student, teacher, train, val, tc, ckpt_dir, resume=bool(cfg.resume),
                               tracker=tracker, evaluate=evaluate, eos_id=tokenizer.eos_token_id)
    finally:
        if tracker is not None:
            tracker.finish()
    metrics = {**result["metrics"], **init_info, "params": num_parameters(result["model"]),
               "teacher_params": num_parameters(teacher), "data_source": source,
               "train_examples": n_train, "val_examples": n_val, **(generated[1] if generated else {})}
    accelerator = result["accelerator"]
    if accelerator.is_main_process:  # one writer under `accelerate launch`; the other ranks wait
        save_model_artifact(ctx.output_dir("distill"), result["model"], tokenizer, stage="distill", config=config,
                            inputs=[teacher_art], metrics=metrics, started=started, dtype=str(cfg.distill.save_dtype))
        remove_checkpoint(ckpt_dir)  # only once the artifact is safely in place
    accelerator.wait_for_everyone()
    return Artifact.load(ctx.output_dir("distill"))
