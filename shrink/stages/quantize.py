"""stage=quantize: weight-only int8/int4 by RTN, GPTQ or AWQ, SmoothQuant W8A8, or fp8, layer by
layer on calibration data; a pruned input keeps its zeros (2:4 then int4). Saved in the
compressed-tensors format."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from shrink.artifacts import Artifact, write_artifact
from shrink.compress.calib_data import calibration_ids
from shrink.compress.calibration import compress_model
from shrink.compress.compressed_tensors_io import is_quantized, load_compressed, save_compressed, sparsity_masks
from shrink.compress.settings import calib_config, quant_method, skip_list
from shrink.context import StageContext
from common.errors import ShrinkError
from shrink.modeling import load_tokenizer, resolve_dtype
from shrink.stages import register_stage
from shrink.stages.prune import sparsity_metadata
from train.data import data_dir


@register_stage("quantize")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    qcfg = cfg.quantize
    method = quant_method(qcfg)
    skip = skip_list(qcfg, "quantize")
    source = ctx.input
    if is_quantized(source.path):
        raise ShrinkError(f"input={source.path} is already quantized")
    if method.method == "fp8" and ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) < (8, 9):
        raise ShrinkError("quantize.method=fp8 needs a GPU with fp8 (compute capability 8.9+)")
    model = load_compressed(source.path, dtype=torch.float32)
    masks, structure = sparsity_masks(model, source.path)
    method.masks = masks
    tokenizer = load_tokenizer(source)
    calib = calib_config(qcfg, "quantize")
    ids = calibration_ids(calib, tokenizer, data_dir(cfg.get("data_dir")), "quantize") if method.needs_data else None
    print(f"quantize: {method.method} int{method.spec.bits} g{method.spec.group_size} on {ctx.device}"
          + (f" (keeping {structure} sparsity of {len(masks)} linears)" if masks else ""))
    report = compress_model(model, method, ids, ctx.device, skip=skip, on_indivisible=str(qcfg.on_indivisible),
                            batch_size=calib.batch_size, key="quantize")
    meta = sparsity_metadata(model, masks, structure) if masks else None
    if masks:
        # Zeros must survive quantization; a violation here would be a bug, not a user error.
        for name, keep in masks.items():
            w = model.get_submodule(name).weight
            assert bool((w[~keep.to(w.device)] == 0).all()), f"{name}: pruned weights became nonzero"
    metrics = {"method": method.method, "bits": method.spec.bits, "group_size": method.spec.group_size,
               "symmetric": method.spec.symmetric, **report.summary()}
    dtype = resolve_dtype(str(qcfg.save_dtype))
    return write_artifact(ctx.output_dir("quantize"), stage="quantize",
                          save=lambda tmp: save_compressed(model, tmp, dtype=dtype, sparsity=meta, tokenizer=tokenizer),
                          config=ctx.resolved_config("quantize"), inputs=[source], metrics=metrics, started=started)
