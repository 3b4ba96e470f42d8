"""stage=quantize: a recipe of methods (transforms such as SmoothQuant or AWQ, then one weight
quantizer: RTN, GPTQ or fp8) run layer by layer in one calibration pass; a pruned input keeps its
zeros (2:4 then int4). Saved in the compressed-tensors format."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from common.errors import config_section
from shrink.artifacts import Artifact
from shrink.compress.compress_artifact import CompressionSettings, compress_artifact
from shrink.compress.settings import quantize_settings, stage_data_dir
from shrink.context import StageContext
from shrink.stages import register_stage


def quantize(model_artifact: Artifact, settings: CompressionSettings, *, dest: Path, device: torch.device,
             data_dir: Path | None = None, config: dict | None = None) -> Artifact:
    """Quantize `model_artifact` with `settings.recipe` into a new artifact at `dest`."""
    scheme = settings.recipe[-1].scheme
    metrics = {"method": "+".join(settings.names), "bits": scheme.bits, "group_size": scheme.group_size,
               "symmetric": scheme.symmetric}
    return compress_artifact(model_artifact, settings, stage="quantize", dest=dest, device=device,
                             data_dir=data_dir, config=config, metrics=metrics)


@register_stage("quantize")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    with config_section("quantize"):
        settings = quantize_settings(cfg.quantize)
        return quantize(ctx.input, settings, dest=ctx.output_dir("quantize"), device=ctx.device,
                        data_dir=stage_data_dir(ctx), config=ctx.resolved_config("quantize"))
