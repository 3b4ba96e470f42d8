"""stage=gqa: pool the input's K/V heads into fewer groups, uptrain by distillation from the
pre-conversion model, and report what it buys (KV-cache bytes) and costs (perplexity).

`gqa(...)` is the stage as a typed function (experiments call it and `measure_ppl` / `uptrain`);
`run` reads the config into it."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from common.errors import ShrinkError, config_section
from eval.perplexity import encode, perplexity, wikitext2_text
from shrink.artifacts import META_FILE, Artifact
from shrink.compress.fake_quant import fake_quantizer
from shrink.config_check import gqa_train_config
from shrink.context import StageContext, checkpoint_dir_name
from shrink.gqa_surgery import check_target, convert, kv_report, resolve_init, svd_calibration
from shrink.modeling import load_model, load_tokenizer, num_parameters, save_model_artifact
from shrink.stages import register_stage
from shrink.tracking import make_tracker
from train.checkpoint import check_checkpoint_fits, remove_checkpoint, resume_note
from train.data import load_packed
from train.loop import TrainConfig, train_distill

CKPT_DIR = checkpoint_dir_name("gqa")
DISTILL_DIR = "distill"


def distill_tokens(input_art: Artifact, run_dir: Path) -> int | None:
    """`train_tokens` of the run's distill artifact: in the input's lineage, else run/distill."""
    candidates = [a for a in input_art.lineage() if a.stage == "distill"]
    if (run_dir / DISTILL_DIR / META_FILE).is_file():
        candidates.append(Artifact.load(run_dir / DISTILL_DIR))
    for art in candidates:
        if art.metrics.get("train_tokens"):
            return int(art.metrics["train_tokens"])
    return None


def resolve_budget(gcfg: DictConfig, input_art: Artifact, run_dir: Path) -> tuple[int, str]:
    """Uptraining tokens and where the number came from."""
    if gcfg.get("tokens") is not None:
        tokens = int(gcfg.tokens)
        if tokens < 0:
            raise ShrinkError(f"gqa.tokens must be >= 0, got {tokens}")
        return tokens, "gqa.tokens"
    fraction = float(gcfg.get("budget_fraction") or 0.0)
    if fraction < 0:
        raise ShrinkError(f"gqa.budget_fraction must be >= 0, got {fraction}")
    if fraction == 0:
        return 0, "gqa.budget_fraction=0"
    base = distill_tokens(input_art, run_dir)
    if base is None:
        raise ShrinkError(f"gqa.budget_fraction={fraction} needs the run's distill artifact (metrics.train_tokens) "
                          f"in the lineage of {input_art.path} or at {run_dir / DISTILL_DIR}; none found: "
                          f"set gqa.tokens=N instead")
    return int(round(fraction * base)), f"gqa.budget_fraction={fraction} of distill train_tokens={base}"


def eval_texts(names: list[str], tokenizer: Any, shared: Path | None, heldout: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "wikitext2":
            if shared is None or not (shared / "wikitext-2-raw").is_dir():
                print("gqa: WikiText-2 not found (set data_dir= or SHRINK_DATA_DIR); skipped")
                continue
            out[name] = encode(tokenizer, wikitext2_text(shared))
        elif name == "heldout":
            if heldout is not None:
                out[name] = heldout.reshape(-1)
        else:
            raise ShrinkError(f"gqa.eval.datasets: unknown dataset {name!r} (known: wikitext2, heldout)")
    return out


def measure_ppl(model: torch.nn.Module, texts: dict[str, torch.Tensor], context: int, stride: int,
                max_windows: int | None, dtype: str, full_windows_only: bool = False) -> dict[str, float]:
    """Perplexity per dataset; bf16 autocast on a GPU when `dtype` asks for it (weights stay fp32)."""
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda" and dtype in ("auto", "bf16", "bfloat16")
    was_training = model.training
    model.eval()
    out = {}
    with torch.autocast("cuda", torch.bfloat16) if use_bf16 else contextlib.nullcontext():
        for name, ids in texts.items():
            out[name] = perplexity(model, ids, context, stride, max_windows, full_windows_only).ppl
    model.train(was_training)
    return out


def uptrain(student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor, val: torch.Tensor,
            tc: TrainConfig, ckpt_dir: Path, resume: bool = False, tracker: Any = None,
            save_dtype: str = "bf16") -> dict:
    """Distil the converted model from the pre-conversion one with the shared training loop (`save_dtype`: the
    artifact's, for a QAT run's record)."""
    teacher.requires_grad_(False)
    student.requires_grad_(True)  # a copy of a teacher frozen by an earlier uptrain would be frozen too
    with config_section("gqa.train"):
        return train_distill(student, teacher, train, val, tc, ckpt_dir, resume=resume, tracker=tracker,
                             name="gqa.train", fake_quant=fake_quantizer(tc.qat, save_dtype))


@dataclass
class GQASettings:
    """What the conversion does and how it is measured (the gqa config section, read)."""

    mode: str = "pool"                     # pool | expand
    kv_heads: int | None = 1               # target key/value heads (expand: None = one per query head)
    init: str = "auto"                     # pool init: auto (svd where the model takes it, else mean) | mean |
                                           # first | random | svd
    seed: int = 0
    kv_shape: tuple[int, int, int] = (8, 2048, 2)  # KV-cache report: batch, context, bytes per element
    eval_datasets: tuple[str, ...] = ()    # wikitext2 | heldout
    ppl_args: tuple[int, int, int | None, str] = (2048, 2048, None, "auto")  # context, stride, max windows, dtype
    save_dtype: str = "bf16"


@dataclass
class Uptrain:
    """Distillation from the pre-conversion model after converting."""

    train: TrainConfig                     # max_steps derived from the token budget
    resume: bool = False
    tracker: Callable[[], Any] | None = None   # makes the experiment tracker, if any


def gqa(model_artifact: Artifact, settings: GQASettings, *, dest: Path, device: torch.device, data: Any = None,
        data_dir: Path | None = None, cache_dir: Path | None = None, uptraining: Uptrain | None = None,
        budget: tuple[int, str] = (0, "expand is exact"), ckpt_dir: Path | None = None,
        config: dict | None = None) -> Artifact:
    """Convert `model_artifact`'s K/V heads (then uptrain) into an artifact at `dest`. `data` is a `data`
    config group (train.data.load_packed) for uptraining and the heldout perplexity; `budget` is the
    uptraining token budget and where it came from (recorded); `ckpt_dir` holds the uptraining
    checkpoint and is removed once the artifact is saved."""
    from transformers import AutoConfig

    started = time.time()
    s = settings
    model_config = AutoConfig.from_pretrained(model_artifact.path)
    check_target(model_config, s.mode, s.kv_heads, s.init)
    init = resolve_init(model_config, s.init) if s.mode == "pool" else None
    teacher = load_model(model_artifact, dtype="fp32", device=device)
    tokenizer = load_tokenizer(model_artifact)
    svd = init == "svd"
    packed = None
    if uptraining is not None or "heldout" in s.eval_datasets or svd:
        packed = load_packed(data, tokenizer, data_dir, cache_dir)
    texts = eval_texts(list(s.eval_datasets), tokenizer, data_dir, packed.val if packed is not None else None)

    metrics: dict[str, Any] = {"mode": s.mode, "init": init}
    for key, value in kv_report(teacher.config, *s.kv_shape).items():
        metrics[f"{key}_before"] = value
    for name, value in measure_ppl(teacher, texts, *s.ppl_args).items():
        metrics[f"ppl_{name}_before"] = value
        print(f"gqa: {name} ppl before conversion {value:.3f}")

    calibration = svd_calibration(packed.train) if svd else None  # rows the uptraining also sees, never eval's
    student = convert(copy.deepcopy(teacher), s.mode, s.kv_heads, init or "mean", seed=s.seed, calibration=calibration)
    for key, value in kv_report(student.config, *s.kv_shape).items():
        metrics[f"{key}_after"] = value
    metrics["kv_bytes_ratio"] = metrics["kv_bytes_per_token_after"] / metrics["kv_bytes_per_token_before"]
    for name, value in measure_ppl(student, texts, *s.ppl_args).items():
        metrics[f"ppl_{name}_converted"] = value
        print(f"gqa: {name} ppl right after conversion ({s.mode}, {init}) {value:.3f}")

    metrics.update({"uptrain_tokens_budget": budget[0], "budget_source": budget[1]})
    if uptraining is not None:
        if ckpt_dir is None:
            raise ShrinkError("gqa: uptraining needs a checkpoint directory")
        if uptraining.resume:
            check_checkpoint_fits(ckpt_dir, student, "gqa.kv_heads and gqa.mode")
            print(resume_note(ckpt_dir, "gqa") or f"gqa: resuming from {ckpt_dir}")
        tracker = uptraining.tracker() if uptraining.tracker is not None else None
        try:
            result = uptrain(student, teacher, packed.train, packed.val, uptraining.train, ckpt_dir,
                             resume=uptraining.resume, tracker=tracker, save_dtype=s.save_dtype)
        finally:
            if tracker is not None:
                tracker.finish()
        student = result["model"]
        metrics.update({f"uptrain_{k}": v for k, v in result["metrics"].items() if k != "qat"})
        if "qat" in result["metrics"]:  # where stage=quantize looks for it
            metrics["qat"] = result["metrics"]["qat"]
        for name, value in measure_ppl(student, texts, *s.ppl_args).items():
            metrics[f"ppl_{name}_uptrained"] = value
            print(f"gqa: {name} ppl after uptraining {value:.3f}")
    metrics.update({"params_before": num_parameters(teacher), "params": num_parameters(student)})
    artifact = save_model_artifact(dest, student, tokenizer, stage="gqa", config=config, inputs=[model_artifact],
                                   metrics=metrics, started=started, dtype=s.save_dtype)
    if ckpt_dir is not None:
        remove_checkpoint(ckpt_dir)
    return artifact


@register_stage("gqa")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    from transformers import AutoConfig

    gcfg = cfg.gqa
    mode, init = str(gcfg.mode), str(gcfg.init)
    target = None if gcfg.get("kv_heads") is None else int(gcfg.kv_heads)
    input_art = ctx.input
    # Every check runs on config.json and shrink.json alone, before any weights or data are read.
    check_target(AutoConfig.from_pretrained(input_art.path), mode, target, init)
    tokens, budget_source = resolve_budget(gcfg, input_art, ctx.run_dir) if mode == "pool" else (
        0, "expand is exact" if mode == "expand" else "keep: KV heads unchanged")
    eval_names = tuple(str(n) for n in gcfg.eval.datasets)
    kv, ev = gcfg.kv_report, gcfg.eval
    settings = GQASettings(mode, target, init, int(cfg.seed), (int(kv.batch), int(kv.context), int(kv.bytes_per_element)),
                           eval_names, (int(ev.context), int(ev.stride), ev.max_windows, str(ev.dtype)),
                           str(gcfg.save_dtype))
    config = ctx.resolved_config("gqa", "data")
    uptraining = None
    if tokens > 0:
        uptraining = Uptrain(gqa_train_config(gcfg, tokens, int(cfg.data.block_size), int(cfg.seed)), bool(cfg.resume),
                             lambda: make_tracker(cfg.logging, ctx.run_dir, "gqa", config))
    return gqa(input_art, settings, dest=ctx.output_dir("gqa"), device=ctx.device, data=cfg.data,
               data_dir=ctx.data_dir, cache_dir=ctx.cache_dir, uptraining=uptraining,
               budget=(tokens, budget_source), ckpt_dir=ctx.run_dir / CKPT_DIR, config=config)
