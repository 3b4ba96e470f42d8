"""stage=distill: initialise a student (from the teacher by depth/width, from a config, or a
pretrained model with the teacher's vocabulary) and train it by distillation: logit losses,
intermediate layers, on-policy (GKD) or sequence-level KD on LM text, or Distilling Step-by-Step
rationale multi-task training on a reasoning task (data.task=cqa|svamp|gsm8k).

`distill(...)` is the stage as a typed function (experiments call it and its pieces: `StudentSpec`,
`load_task_data`); `run` reads the config into it."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import SettingError, ShrinkError, config_section
from common.tasks import Task, TaskExample, get_task
from shrink.artifacts import Artifact
from shrink.compress.fake_quant import fake_quantizer
from shrink.context import StageContext, checkpoint_dir_name
from shrink.engine_sampler import check_sampler, engine_samplers, resolve_sampler
from shrink.launch import is_main_rank
from shrink.modeling import load_model, load_tokenizer, num_parameters, resolve_dtype, save_model_artifact
from shrink.student_budget import TARGET_KEYS, cached_latency, check_budget, choose_shape
from shrink.stages import register_stage
from shrink.teacher_data import TeacherDataSettings, teacher_generated_blocks
from shrink.tracking import make_tracker
from train.checkpoint import check_checkpoint_fits, remove_checkpoint, resume_note
from train.config import TrainConfig
from train.data import load_packed, mix_generated
from train.distributed import main_process_first
from train.layer_distill import parse_layer_map
from train.loop import train_distill
from train.rationale import MultiTaskExamples, few_shot_prompt, palm_rationales, teacher_rationales
from train.student_init import (check_same_vocab, needs_importance, parse_keep_layers, prune_width,
                                student_from_config, student_from_teacher)

CKPT_DIR = checkpoint_dir_name("distill")
INITS = ("teacher_layers", "config", "pretrained")
# Importance / width calibration when the training data is a task (not LM text): the shared corpus.
CALIB_DATA = {"source": "auto", "block_size": 256, "val_fraction": 0.02, "max_docs": 2000, "seed": 0,
              "text_field": "text"}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass
class StudentSpec:
    """How the student starts (the `student` config group). At most one budget (target_params,
    target_bytes, target_latency_ms) chooses its depth and/or width (shrink/student_budget.py);
    `resolve` turns it into keep_layers and width."""

    init: str = "teacher_layers"     # teacher_layers | config | pretrained
    keep_layers: Any = "all"         # every:k | first:n | importance:n | all | [i, j, ...]
    importance: str = "bi"           # bi | drop_loss (for importance:n)
    calib_blocks: int = 16
    width: dict[str, Any] = field(default_factory=dict)   # hidden_size, intermediate_size, num_attention_heads,
                                                          # importance
    config: dict[str, Any] = field(default_factory=dict)  # init=config: overrides of the teacher's config
    path: str | None = None          # init=pretrained
    target_params: int | None = None        # parameters
    target_bytes: int | None = None         # saved bytes at distill.save_dtype
    target_latency_ms: float | None = None  # batch-1 decode ms per token in the engine on the stage's device
    budget_by: str = "depth"         # depth | width | both
    budget: dict[str, Any] | None = None    # set by `resolve`: the shape chosen and how

    def __post_init__(self) -> None:
        key = check_budget(self.targets, self.budget_by)
        if key is None:
            return
        if self.init != "teacher_layers":
            raise SettingError(f"student.{key}", f"needs student.init=teacher_layers (got {self.init!r})", sep=" ")
        fixed = [k for k in ("hidden_size", "intermediate_size") if self.width.get(k)]
        if fixed and self.budget is None:
            raise SettingError(f"student.{key}", f"chooses the width: leave "
                               f"{', '.join('student.width.' + k for k in fixed)} unset "
                               f"(student.width.num_attention_heads may fix the heads)", sep=" ")

    @property
    def targets(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in TARGET_KEYS}

    @classmethod
    def from_cfg(cls, s: Any) -> "StudentSpec":
        def number(key: str, kind: type) -> Any:
            value = s.get(key)
            return None if value is None else kind(value)

        return cls(init=str(s.init), keep_layers=_plain(s.keep_layers), importance=str(s.get("importance", "bi")),
                   calib_blocks=int(s.get("calib_blocks", 16)), width=dict(_plain(s.get("width")) or {}),
                   config=dict(_plain(s.get("config")) or {}), path=str(s.path) if s.get("path") else None,
                   target_params=number("target_params", int), target_bytes=number("target_bytes", int),
                   target_latency_ms=number("target_latency_ms", float), budget_by=str(s.get("budget_by", "depth")))

    def resolve(self, teacher_config: Any, save_dtype: str = "bf16", device: str = "cpu",
                measure: Callable[[Any], float] | None = None) -> "StudentSpec":
        """This spec with its budget turned into the depth (importance:n) and width that meet it, the
        choice in `budget`; itself when no budget is set. Needs config.json alone (and, for a latency
        budget, the engine on `device`; `measure(config) -> ms` replaces it)."""
        key = check_budget(self.targets, self.budget_by)
        if key is None or self.budget is not None:
            return self
        choice = choose_shape(teacher_config, key, getattr(self, key), self.budget_by,
                              heads=self.width.get("num_attention_heads"), save_dtype=resolve_dtype(save_dtype),
                              device=device, measure=measure)
        depth = choice["layers"] < teacher_config.num_hidden_layers
        width = {k: choice[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")
                 if choice[k] != getattr(teacher_config, k)}
        return dataclasses.replace(self, keep_layers=f"importance:{choice['layers']}" if depth else "all",
                                   width={**self.width, **width}, budget=choice)

    @property
    def prunes_width(self) -> bool:
        return any(self.width.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads"))


def student_layers(spec: StudentSpec, n_teacher_layers: int, scores: list[float] | None = None) -> list[int] | None:
    """The teacher layers the student keeps (None unless init=teacher_layers); checked from
    config.json alone before any work (importance:n is checked for range only until scores exist)."""
    if spec.init not in INITS:
        raise ShrinkError(f"student.init={spec.init!r}: expected one of {', '.join(INITS)}")
    if spec.init != "teacher_layers":
        return None
    keep = spec.keep_layers
    if keep == "all":
        return list(range(n_teacher_layers))
    if needs_importance(keep) and scores is None:
        n = parse_keep_layers(f"first:{keep.split(':', 1)[1]}", n_teacher_layers)  # range check only
        return list(range(len(n)))
    return parse_keep_layers(keep, n_teacher_layers, scores)


def build_student(spec: StudentSpec, teacher: torch.nn.Module, tokenizer: Any, device: torch.device,
                  calibration: Callable[[int], torch.Tensor]) -> tuple[torch.nn.Module, list[int] | None, dict]:
    """(student, kept teacher layers or None, metrics about the choice); `calibration(n)` gives n token
    blocks for measuring importance."""
    n_teacher = teacher.config.num_hidden_layers
    info: dict[str, Any] = {"student_init": spec.init}
    if spec.init == "config":
        return student_from_config(teacher.config, dict(spec.config)).to(device), None, info
    if spec.init == "pretrained":
        if not spec.path:
            raise ShrinkError("student.init=pretrained needs student.path")
        student = load_model(Path(spec.path), dtype="fp32", device=device).train()
        check_same_vocab(tokenizer, load_tokenizer(Path(spec.path)), teacher.config.vocab_size,
                         student.config.vocab_size)
        return student.requires_grad_(True), None, info
    if spec.budget is None and check_budget(spec.targets, spec.budget_by) is not None:
        # Resolved once, by the caller, with the stage's save dtype and latency cache: a second
        # resolve here with other defaults could choose another student.
        raise ShrinkError("build_student: the student's budget is not resolved (StudentSpec.resolve first)")
    if spec.budget is not None:
        info["budget"] = spec.budget
    calib = calibration(spec.calib_blocks) if needs_importance(spec.keep_layers) or spec.prunes_width else None
    scores = None
    if needs_importance(spec.keep_layers):
        from train.importance import layer_importance

        scores = layer_importance(teacher, calib, spec.importance)
        info["layer_importance"] = scores
    keep = student_layers(spec, n_teacher, scores)
    info["kept_layers"] = keep
    student = student_from_teacher(teacher, keep)
    if spec.prunes_width:
        from train.importance import channel_importance

        width = spec.width
        imp = channel_importance(student, calib) if str(width.get("importance", "activation")) == "activation" else None
        student = prune_width(student, width.get("hidden_size"), width.get("intermediate_size"), imp,
                              width.get("num_attention_heads"))
        info["width"] = {k: width.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
    return student, keep, info


@dataclass
class TaskDataSpec:
    """Multi-task (label + rationale) training on a reasoning task (the `data` group with `task`)."""

    task: str
    rationale: str = "none"          # palm | teacher | none | a column of the task's examples
    alpha: float = 0.5
    max_len: int = 256
    val_fraction: float = 0.02
    min_val: int = 1                 # held-out examples at least
    max_train: int | None = None
    max_eval: int | None = None
    eval_split: str = "test"
    eval_batch_size: int = 64
    shots: int = 4                   # rationale=teacher: few-shot demonstrations (PaLM rationales)
    rationale_max_new_tokens: int = 96
    rationale_batch_size: int = 32

    @classmethod
    def from_cfg(cls, d: Any) -> "TaskDataSpec":
        tr = d.get("teacher_rationale") or {}
        return cls(task=str(d.task), rationale=str(d.get("rationale", "none")), alpha=float(d.alpha),
                   max_len=int(d.max_len), val_fraction=float(d.get("val_fraction", 0.02)),
                   max_train=int(d.max_train) if d.get("max_train") else None,
                   max_eval=int(d.max_eval) if d.get("max_eval") else None,
                   eval_split=str(d.get("eval_split", "test")), eval_batch_size=int(d.get("eval_batch_size", 64)),
                   shots=int(tr.get("shots", 4)), rationale_max_new_tokens=int(tr.get("max_new_tokens", 96)),
                   rationale_batch_size=int(tr.get("batch_size", 32)))


@dataclass
class TaskData:
    task: Task
    train: MultiTaskExamples
    val: MultiTaskExamples
    test: list[TaskExample]


def task_rationales(spec: TaskDataSpec, task: Task, train: list[TaskExample], shared: Path,
                    generate: Callable[[list[str], int], list[str]] | None, cache_dir: Path | None,
                    model_id: str) -> list[str | None]:
    """The rationale of each training example (as many as are used) from `spec.rationale`;
    `generate(prompts, max_new_tokens)` writes them for rationale=teacher."""
    source = spec.rationale
    if source == "palm":
        return list(palm_rationales(shared, task.name, "train"))
    if source == "none":
        return [None] * len(train)
    if source == "teacher":
        if generate is None or cache_dir is None:
            raise ShrinkError("data.rationale=teacher needs the teacher to generate rationales")
        shots = few_shot_prompt(list(zip(train, palm_rationales(shared, task.name, "train")))[: spec.shots])
        subset = train[: spec.max_train] if spec.max_train else train
        n = spec.rationale_max_new_tokens
        return list(teacher_rationales(lambda prompts: generate(prompts, n), subset, shots, cache_dir, model_id, n))
    if source not in train[0].explanation:
        raise ShrinkError(f"data.rationale={source!r}: expected palm, teacher, none or a column of "
                          f"{task.name} ({', '.join(train[0].explanation) or 'none'})")
    return [ex.explanation.get(source) for ex in train]


def load_task_data(spec: TaskDataSpec, shared: Path | None, tokenizer: Any,
                   generate: Callable[[list[str], int], list[str]] | None = None, cache_dir: Path | None = None,
                   model_id: str = "teacher") -> TaskData:
    """Train / validation multi-task examples and the evaluation split of `spec.task`."""
    task = get_task(spec.task)
    if shared is None:
        raise ShrinkError("data.task needs the shared data (set data_dir= or SHRINK_DATA_DIR)")
    train = task.load(shared, "train")
    pairs = list(zip(train, task_rationales(spec, task, train, shared, generate, cache_dir, model_id)))
    if spec.max_train:
        pairs = pairs[: spec.max_train]
    n_val = max(spec.min_val, int(len(pairs) * spec.val_fraction))
    test = task.load(shared, spec.eval_split)
    if spec.max_eval:
        test = test[: spec.max_eval]
    return TaskData(task, MultiTaskExamples(pairs[n_val:], tokenizer, spec.alpha, spec.max_len),
                    MultiTaskExamples(pairs[:n_val], tokenizer, spec.alpha, spec.max_len), test)


def task_evaluator(data: TaskData, spec: TaskDataSpec, tokenizer: Any) -> Callable[[torch.nn.Module], dict]:
    """evaluate(model) -> {task_accuracy, task_eval_n} on the evaluation split."""
    from eval.tasks import task_accuracy

    def evaluate(model: torch.nn.Module) -> dict:
        result = task_accuracy(model, tokenizer, data.task, data.test, spec.eval_batch_size)
        print(f"distill: {data.task.name} {spec.eval_split} accuracy {result['accuracy']:.4f} "
              f"({result['n']} examples)")
        return {f"{data.task.name}_accuracy": result["accuracy"], f"{data.task.name}_eval_n": result["n"]}

    return evaluate


def hf_generate(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Callable[[list[str], int], list[str]]:
    """Greedy continuations by the model itself (eval.tasks.generate_answers): how teacher rationales
    are written."""
    from eval.tasks import generate_answers

    return lambda prompts, max_new_tokens: generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)


def distill(teacher_art: Artifact, student_spec: StudentSpec, data: TaskDataSpec | Any, tc: TrainConfig, *,
            dest: Path, ckpt_dir: Path, device: torch.device, data_dir: Path | None = None,
            cache_dir: Path | None = None, resume: bool = False, save_dtype: str = "bf16",
            config: dict | None = None, tracker: Callable[[], Any] | None = None,
            teacher_data: TeacherDataSettings | None = None, sampler: str = "auto",
            token_frequencies: bool = False,
            student: tuple[torch.nn.Module, list[int] | None, dict] | None = None) -> Artifact:
    """Distil a student (`student_spec`) from `teacher_art` on `data` (a TaskDataSpec, or a `data` config
    group of LM text as train.data.load_packed reads it) with `tc` (its layer_map still a spec, e.g.
    `auto`); saved at `dest`. `tracker()` makes the experiment tracker, if any; `teacher_data` mixes
    teacher-generated samples (made through the engine, cached) into LM training text. `sampler`
    (engine | transformers) continues the prompts of on-policy and sequence-level KD steps.
    `token_frequencies`: the artifact also holds the training text's token counts
    (engine/spec_decode/draft_vocab.py's file), from which a drafter's `draft_vocab_size` takes its rows.
    `student`: what `build_student` returned for this (resolved) `student_spec`, from a caller that measured
    the student before training it (experiments/depth_vs_width.py): trained as given, so its layer and
    channel importance is not measured, nor its calibration data loaded, a second time."""
    started = time.time()
    with config_section("distill"):
        sampler = resolve_sampler(check_sampler(sampler), device)
        fake_quant = fake_quantizer(tc.qat, save_dtype)
    n_teacher = int(json.loads((teacher_art.path / "config.json").read_text())["num_hidden_layers"])
    from transformers import AutoConfig

    # Fail on a bad spec (or a budget no student meets) before loading anything; a latency budget is
    # measured here, on random weights of the candidate shapes (by the main process first: the others,
    # and a resumed run, read its cached timings and so choose the same student).
    measure = cached_latency(cache_dir, device.type) if cache_dir is not None else None
    with main_process_first():
        student_spec = student_spec.resolve(AutoConfig.from_pretrained(teacher_art.path), save_dtype, device.type,
                                            measure)
    student_layers(student_spec, n_teacher)
    # Master weights in fp32; on a GPU accelerate runs the forward in bf16 autocast.
    teacher = load_model(teacher_art, dtype="fp32", device=device)
    tokenizer = load_tokenizer(teacher_art)
    calib_cfg = OmegaConf.create(CALIB_DATA) if isinstance(data, TaskDataSpec) else data

    def calibration(n_blocks: int) -> torch.Tensor:
        return load_packed(calib_cfg, tokenizer, data_dir, cache_dir).train[:n_blocks]

    if student is None:
        student, keep, init_info = build_student(student_spec, teacher, tokenizer, device, calibration)
    else:
        student, keep, init_info = student
    if resume:
        if not tc.lora:  # LoRA checkpoints name the wrapped modules
            check_checkpoint_fits(ckpt_dir, student, "student.* settings (student.keep_layers, student.width, ...)")
        print(resume_note(ckpt_dir, "distill") or f"distill: resuming from {ckpt_dir}")
    teacher.requires_grad_(False)
    evaluate, generated_info = None, {}
    if isinstance(data, TaskDataSpec):
        generate = hf_generate(teacher, tokenizer, data.rationale_batch_size)
        task_data = load_task_data(data, data_dir, tokenizer, generate, cache_dir,
                                   str(teacher.config._name_or_path or "teacher"))
        train, val, evaluate = task_data.train, task_data.val, task_evaluator(task_data, data, tokenizer)
        source = f"task:{data.task} rationale={data.rationale}"
        n_train, n_val = len(train), len(val)
    else:
        with main_process_first():  # one rank tokenizes and caches; the others read its cache
            packed = load_packed(data, tokenizer, data_dir, cache_dir)
        train, val, source = packed.train, packed.val, packed.source
        n_train, n_val = int(packed.train.shape[0]), int(packed.val.shape[0])
        if teacher_data is not None and teacher_data.ratio > 0:
            samples, generated_info = teacher_generated_blocks(teacher_data, teacher_art, tokenizer, packed.train,
                                                               cache_dir, str(device))
            train = mix_generated(train, samples, teacher_data.ratio, tokenizer.eos_token_id, teacher_data.seed)
            source = f"{source} + teacher-generated ({teacher_data.ratio:.0%} of blocks)"
    with config_section("distill"):
        tc = dataclasses.replace(tc, layer_map=parse_layer_map(tc.layer_map, student.config.num_hidden_layers,
                                                              n_teacher, keep))
    if tc.layer_map and not tc.layer_weight:
        raise ShrinkError("distill.layer_map is set but distill.layer_weight is 0")
    samplers = {}
    if sampler == "engine":  # one engine per sampled model, built once (the student's takes its live weights)
        with config_section("distill"):
            samplers = engine_samplers(student, teacher_art.path, tc.batch_size, tc.prompt_len, tc.max_new_tokens,
                                       tc.lmbda > 0, tc.seq_kd, ckpt_dir.parent, device)
        if samplers:
            print(f"distill: {' and '.join(k.split('_')[0] for k in samplers)} samples through the engine")
    run_tracker = tracker() if tracker is not None and is_main_rank() else None  # one writer of the run's logs
    try:
        with config_section("distill"):
            result = train_distill(student, teacher, train, val, tc, ckpt_dir, resume=resume, tracker=run_tracker,
                                   evaluate=evaluate, eos_id=tokenizer.eos_token_id, name="distill",
                                   fake_quant=fake_quant, **samplers)
    finally:
        if run_tracker is not None:
            run_tracker.finish()
        for engine_sampler in samplers.values():
            engine_sampler.close()
    metrics = {**result["metrics"], **init_info, "params": num_parameters(result["model"]),
               "teacher_params": num_parameters(teacher), "data_source": source,
               "train_examples": n_train, "val_examples": n_val, **generated_info}
    accelerator = result["accelerator"]
    extra = None
    if token_frequencies:  # what the student was trained on, teacher samples included
        counts = torch.bincount(train.reshape(-1).long().cpu(), minlength=result["model"].config.vocab_size)
        metrics["token_frequencies"] = int((counts > 0).sum())

        def extra(tmp: Path) -> None:
            # imported here: the engine is not loaded by a stage that does not run it (shrink/sources.py)
            from engine.spec_decode.draft_vocab import FREQUENCY_FILE, write_token_frequencies

            write_token_frequencies(str(tmp / FREQUENCY_FILE), counts)
    if accelerator.is_main_process:  # one writer under `accelerate launch`; the other ranks wait
        save_model_artifact(dest, result["model"], tokenizer, stage="distill", config=config,
                            inputs=[teacher_art], metrics=metrics, started=started, dtype=save_dtype, extra=extra)
        remove_checkpoint(ckpt_dir)  # only once the artifact is safely in place
    accelerator.wait_for_everyone()
    return Artifact.load(dest)


@register_stage("distill")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    student = StudentSpec.from_cfg(cfg.student)
    data = TaskDataSpec.from_cfg(cfg.data) if cfg.data.get("task") else cfg.data
    block_size = int(cfg.data.max_len) if isinstance(data, TaskDataSpec) else int(cfg.data.block_size)
    with config_section("distill"):
        tc = TrainConfig.from_cfg(cfg.distill, seed=int(cfg.seed), block_size=block_size)
        sampler = check_sampler(cfg.distill.get("sampler", "auto"))
    if cfg.distill.get("medusa") is not None:  # distill=medusa: heads on the frozen teacher, no student
        from shrink.medusa_distill import run_medusa

        return run_medusa(cfg, ctx, tc)
    config = ctx.resolved_config("distill", "student", "data")
    token_frequencies = cfg.distill.get("token_frequencies", False)
    if not isinstance(token_frequencies, bool):
        raise SettingError("distill.token_frequencies", f"must be true or false, got {token_frequencies!r}")
    if token_frequencies and isinstance(data, TaskDataSpec):
        raise SettingError("distill.token_frequencies", "counts LM training text; data.task trains on examples")
    generated = cfg.data.get("teacher_generated") if not isinstance(data, TaskDataSpec) else None
    teacher_data = TeacherDataSettings.from_cfg(generated, int(cfg.seed)) if generated else None
    return distill(ctx.input, student, data, tc, dest=ctx.output_dir("distill"), ckpt_dir=ctx.run_dir / CKPT_DIR,
                   device=ctx.device, data_dir=ctx.data_dir, cache_dir=ctx.cache_dir, resume=bool(cfg.resume),
                   save_dtype=str(cfg.distill.save_dtype), config=config,
                   tracker=lambda: make_tracker(cfg.logging, ctx.run_dir, "distill", config), teacher_data=teacher_data,
                   sampler=sampler, token_frequencies=token_frequencies)
