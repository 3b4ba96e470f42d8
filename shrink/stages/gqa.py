"""stage=gqa: pool the input's K/V heads into fewer groups, uptrain by distillation from the
pre-conversion model, and report what it buys (KV-cache bytes) and costs (perplexity)."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from eval.perplexity import encode, perplexity, wikitext2_text
from shrink.artifacts import META_FILE, Artifact
from shrink.context import StageContext, checkpoint_dir_name
from common.errors import ShrinkError
from shrink.gqa import check_target, convert, kv_report
from shrink.modeling import load_model, load_tokenizer, num_parameters, save_model_artifact
from shrink.stages import register_stage
from shrink.stages.import_model import cache_dir
from shrink.tracking import make_tracker
from train.checkpoint import check_checkpoint_fits, remove_checkpoint, resume_note
from train.data import data_dir, load_packed
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


def train_config(gcfg: DictConfig, tokens: int, block_size: int, seed: int) -> TrainConfig:
    values = OmegaConf.to_container(gcfg.train, resolve=True)
    known = set(TrainConfig.__dataclass_fields__) - {"max_steps", "seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ShrinkError(f"gqa.train: unknown keys {unknown} (known: {sorted(known)})")
    tc = TrainConfig.from_cfg({**values, "max_steps": 1}, seed=seed, block_size=block_size, prefix="gqa.train")
    tc.max_steps = max(1, math.ceil(tokens / (tc.batch_size * tc.grad_accum * block_size)))
    return tc


def eval_texts(names: list[str], tokenizer: Any, data_dir_value: str | None, heldout: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "wikitext2":
            shared = data_dir(data_dir_value)
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
            tc: TrainConfig, ckpt_dir: Path, resume: bool = False, tracker: Any = None) -> dict:
    """Distil the converted model from the pre-conversion one with the shared training loop."""
    teacher.requires_grad_(False)
    student.requires_grad_(True)  # a copy of a teacher frozen by an earlier uptrain would be frozen too
    return train_distill(student, teacher, train, val, tc, ckpt_dir, resume=resume, tracker=tracker)


@register_stage("gqa")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    from transformers import AutoConfig

    started = time.time()
    gcfg = cfg.gqa
    mode, init = str(gcfg.mode), str(gcfg.init)
    target = None if gcfg.get("kv_heads") is None else int(gcfg.kv_heads)
    input_art = ctx.input
    # Every check runs on config.json and shrink.json alone, before any weights or data are read.
    model_config = AutoConfig.from_pretrained(input_art.path)
    check_target(model_config, mode, target, init)
    tokens, budget_source = resolve_budget(gcfg, input_art, ctx.run_dir) if mode == "pool" else (
        0, "expand is exact" if mode == "expand" else "keep: KV heads unchanged")
    eval_names = [str(n) for n in gcfg.eval.datasets]
    kv = gcfg.kv_report
    kv_args = (int(kv.batch), int(kv.context), int(kv.bytes_per_element))
    tc = train_config(gcfg, tokens, int(cfg.data.block_size), int(cfg.seed)) if tokens > 0 else None

    device = ctx.device
    teacher = load_model(input_art, dtype="fp32", device=device)
    tokenizer = load_tokenizer(input_art)
    data = None
    if tokens > 0 or "heldout" in eval_names:
        data = load_packed(cfg.data, tokenizer, cfg.get("data_dir"), cache_dir(cfg))
    texts = eval_texts(eval_names, tokenizer, cfg.get("data_dir"), data.val if data is not None else None)
    ev = gcfg.eval
    ppl_args = (int(ev.context), int(ev.stride), ev.max_windows, str(ev.dtype))

    metrics: dict[str, Any] = {"mode": mode, "init": init if mode == "pool" else None}
    for key, value in kv_report(model_config, *kv_args).items():
        metrics[f"{key}_before"] = value
    for name, value in measure_ppl(teacher, texts, *ppl_args).items():
        metrics[f"ppl_{name}_before"] = value
        print(f"gqa: {name} ppl before conversion {value:.3f}")

    student = convert(copy.deepcopy(teacher), mode, target, init, seed=int(cfg.seed))
    for key, value in kv_report(student.config, *kv_args).items():
        metrics[f"{key}_after"] = value
    metrics["kv_bytes_ratio"] = metrics["kv_bytes_per_token_after"] / metrics["kv_bytes_per_token_before"]
    for name, value in measure_ppl(student, texts, *ppl_args).items():
        metrics[f"ppl_{name}_converted"] = value
        print(f"gqa: {name} ppl right after conversion ({mode}, {init}) {value:.3f}")

    metrics.update({"uptrain_tokens_budget": tokens, "budget_source": budget_source})
    config = ctx.resolved_config("gqa", "data")
    if tc is not None:
        if cfg.resume:
            check_checkpoint_fits(ctx.run_dir / CKPT_DIR, student, "gqa.kv_heads and gqa.mode")
            print(resume_note(ctx.run_dir / CKPT_DIR, "gqa") or f"gqa: resuming from {ctx.run_dir / CKPT_DIR}")
        tracker = make_tracker(cfg.logging, ctx.run_dir, "gqa", config)
        try:
            result = uptrain(student, teacher, data.train, data.val, tc, ctx.run_dir / CKPT_DIR,
                             resume=bool(cfg.resume), tracker=tracker)
        finally:
            if tracker is not None:
                tracker.finish()
        student = result["model"]
        metrics.update({f"uptrain_{k}": v for k, v in result["metrics"].items()})
        for name, value in measure_ppl(student, texts, *ppl_args).items():
            metrics[f"ppl_{name}_uptrained"] = value
            print(f"gqa: {name} ppl after uptraining {value:.3f}")
    metrics.update({"params_before": num_parameters(teacher), "params": num_parameters(student)})
    artifact = save_model_artifact(ctx.output_dir("gqa"), student, tokenizer, stage="gqa", config=config,
                                   inputs=[input_art], metrics=metrics, started=started,
                                   dtype=str(gcfg.save_dtype))
    remove_checkpoint(ctx.run_dir / CKPT_DIR)
    return artifact
