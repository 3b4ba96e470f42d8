"""What stage=prune and stage=quantize share: load an artifact, check the recipe against the model,
calibrate and compress, save the result (compressed-tensors, with sparsity metadata when the model
is sparse) as an artifact. Everything that can be checked is checked before calibration starts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.errors import SettingError, ShrinkError
from shrink.artifacts import Artifact, write_artifact
from shrink.compress.calib_data import CalibConfig, calibration_ids
from shrink.compress.calibration import (DEFAULT_SKIP, ON_INDIVISIBLE, Report, check_skip, compress_model,
                                         plan_compression)
from shrink.compress.compressed_tensors_io import (is_quantized, load_compressed, model_skeleton, save_compressed,
                                                   sparsity_masks, sparsity_metadata)
from shrink.compress.methods.base import CompressionMethod
from shrink.modeling import load_tokenizer

# (model, tokenizer, report, metrics) -> the model to save; prune's fine-tune
Refine = Callable[[nn.Module, Any, Report, dict], nn.Module]


@dataclass(frozen=True)
class CompressionSettings:
    recipe: list[CompressionMethod]
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    on_indivisible: str = "skip"    # a linear a method cannot compress: skip (leave dense) or error
    calibration: CalibConfig = field(default_factory=CalibConfig)
    save_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.on_indivisible not in ON_INDIVISIBLE:
            raise SettingError("on_indivisible", f"must be skip or error (got {self.on_indivisible!r})")
        check_skip(self.skip)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.recipe]


def compress_artifact(source: Artifact, settings: CompressionSettings, *, stage: str, dest: Path,
                      device: torch.device, data_dir: Path | None, config: dict | None = None,
                      metrics: dict | None = None, refine: Refine | None = None,
                      log: Callable[[str], None] = print) -> Artifact:
    started = time.time()
    if is_quantized(source.path):
        raise ShrinkError(f"input={source.path} is already quantized: prune and quantize a model that is not")
    for method in settings.recipe:
        method.check_device(device)
    plan_compression(model_skeleton(source.path), settings.recipe, settings.skip, settings.on_indivisible)
    model = load_compressed(source.path, dtype=torch.float32)
    masks, structure = sparsity_masks(model, source.path)
    tokenizer = load_tokenizer(source)
    needs_data = any(m.needs_data for m in settings.recipe)
    ids = calibration_ids(settings.calibration, tokenizer, data_dir) if needs_data else None
    log(f"{stage}: {' + '.join(settings.names)} on {device}"
        + (f" (keeping the {structure} sparsity of {len(masks)} linears)" if masks else ""))
    report = compress_model(model, settings.recipe, ids, device, skip=settings.skip,
                            on_indivisible=settings.on_indivisible, batch_size=settings.calibration.batch_size,
                            masks=masks, log=log)
    report.sparsity_structure = report.sparsity_structure or structure
    metrics = {"recipe": settings.names, **(metrics or {}), **report.summary()}
    if refine is not None:
        model = refine(model, tokenizer, report, metrics)
    for name, keep in report.masks.items():
        # Zeros must survive every method; a violation would be a bug, not a user error.
        w = model.get_submodule(name).weight
        assert bool((w[~keep.to(w.device)] == 0).all()), f"{name}: pruned weights became nonzero"
    meta = sparsity_metadata(report.masks, report.sparsity_structure) if report.masks else None
    if meta is not None:
        metrics["sparsity_of_pruned"] = meta["global_sparsity"]
    return write_artifact(dest, stage=stage, config=config, inputs=[source], metrics=metrics, started=started,
                          save=lambda tmp: save_compressed(model, tmp, dtype=settings.save_dtype, sparsity=meta,
                                                           tokenizer=tokenizer))
