"""stage=prune: 2:4 or unstructured sparsity by magnitude, Wanda or SparseGPT, layer by layer on
calibration data, then an optional mask-preserving distillation fine-tune; saved with
compressed-tensors sparsity metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from common.errors import config_section
from shrink.artifacts import Artifact
from shrink.compress.calibration import Report
from shrink.compress.compress_artifact import CompressionSettings, compress_artifact
from shrink.compress.compressed_tensors_io import load_compressed
from shrink.compress.finetune import mask_preserving_finetune
from shrink.compress.settings import prune_settings, stage_cache_dir, stage_data_dir
from shrink.compress.sparsity import sparsity
from shrink.context import StageContext
from shrink.modeling import num_parameters
from shrink.stages import register_stage
from train.loop import TrainConfig

CKPT_DIR = ".prune.ckpt"


@dataclass
class Finetune:
    """Mask-preserving distillation from the unpruned input after pruning."""

    train: TrainConfig
    data: Any                       # a `data` config group, as train.data.load_packed reads it
    ckpt_dir: Path
    cache_dir: Path | None = None


def prune(model_artifact: Artifact, settings: CompressionSettings, *, dest: Path, device: torch.device,
          data_dir: Path | None = None, finetune: Finetune | None = None, config: dict | None = None) -> Artifact:
    """Prune `model_artifact` with the pruner `settings.recipe[0]` (then fine-tune) into `dest`."""
    spec = settings.recipe[0].spec

    def refine(model: torch.nn.Module, tokenizer: Any, report: Report, metrics: dict) -> torch.nn.Module:
        pruned = [n for n, info in report.layers.items() if "sparsity" in info]
        if finetune is not None:
            from train.data import load_packed

            teacher = load_compressed(model_artifact.path, dtype=torch.float32)
            data = load_packed(finetune.data, tokenizer, str(data_dir) if data_dir else None, finetune.cache_dir)
            with config_section("prune.finetune"):
                result = mask_preserving_finetune(model, teacher, report.masks, data.train, data.val,
                                                  finetune.train, finetune.ckpt_dir, save_dtype=settings.save_dtype)
            model = result["model"].cpu()
            metrics["finetune"] = result["metrics"]
            if "qat" in result["metrics"]:  # where stage=quantize looks for it
                metrics["qat"] = metrics["finetune"].pop("qat")
        metrics["params"] = num_parameters(model)
        metrics["weight_sparsity_after"] = sum(sparsity(model.get_submodule(n).weight) for n in pruned) / len(pruned)
        return model

    return compress_artifact(model_artifact, settings, stage="prune", dest=dest, device=device, data_dir=data_dir,
                             config=config, metrics={"method": settings.names[0], "structure": spec.structure},
                             refine=refine)


@register_stage("prune")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    with config_section("prune"):
        settings = prune_settings(cfg.prune)
        finetune = None
        if bool(cfg.prune.finetune.enabled):
            with config_section("prune.finetune"):  # inside "prune": names its section first
                tc = TrainConfig.from_cfg(cfg.prune.finetune, seed=int(cfg.seed),
                                          block_size=int(cfg.data.block_size))
            finetune = Finetune(tc, cfg.data, ctx.run_dir / CKPT_DIR, stage_cache_dir(ctx))
        return prune(ctx.input, settings, dest=ctx.output_dir("prune"), device=ctx.device,
                     data_dir=stage_data_dir(ctx), finetune=finetune, config=ctx.resolved_config("prune"))
