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
from shrink.compress.scheme import QuantSpec
from shrink.compress.settings import quantize_settings, stage_data_dir
from shrink.context import StageContext
from shrink.stages import register_stage


def qat_note(model_artifact: Artifact, settings: CompressionSettings) -> str | None:
    """A line about an input trained onto a grid by QAT (its metrics.qat): a warning when this recipe quantizes
    it onto another grid (or rescales it first), else that rtn reproduces it; None for other inputs."""
    record = model_artifact.metrics.get("qat")
    if not record or not record.get("snapped"):
        return None
    trained = QuantSpec(int(record["bits"]), record["group_size"], bool(record["symmetric"]))
    quantizer = settings.recipe[-1]
    here = "fp8" if quantizer.name == "fp8" else quantizer.scheme.describe()
    where = f"{model_artifact.path.name} was trained by QAT onto the {trained.describe()} grid"
    if here != trained.describe():
        return (f"warning: quantize: {where}, but this stage quantizes to {here} (quantize.bits / group_size / "
                f"symmetric): its weights are rounded a second time, onto another grid; set the quantize scheme "
                f"to the QAT one, or train with qat matching it")
    transforms = [m.name for m in settings.recipe[:-1]]
    if transforms:
        return (f"warning: quantize: {where}, but {'+'.join(transforms)} rescales the weights off that grid "
                f"before {quantizer.name} quantizes them")
    if quantizer.name != "rtn":  # the message said rtn whatever the recipe ran
        return (f"quantize: {where}, the one this stage quantizes to; {quantizer.name} moves a few of the trained "
                f"codes (quantize.recipe=[rtn] gives them back exactly)")
    return f"quantize: {where}, the one this stage quantizes to: rtn gives back the trained codes exactly"


def quantize(model_artifact: Artifact, settings: CompressionSettings, *, dest: Path, device: torch.device,
             data_dir: Path | None = None, config: dict | None = None) -> Artifact:
    """Quantize `model_artifact` with `settings.recipe` into a new artifact at `dest`."""
    note = qat_note(model_artifact, settings)
    if note is not None:
        print(note, flush=True)
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
