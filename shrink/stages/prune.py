"""stage=prune: 2:4 or unstructured sparsity by magnitude, Wanda or SparseGPT, layer by layer on
calibration data, then an optional mask-preserving distillation fine-tune; saved with
compressed-tensors sparsity metadata."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from shrink.artifacts import Artifact, write_artifact
from shrink.compress.calib_data import calibration_ids
from shrink.compress.calibration import compress_model
from shrink.compress.compressed_tensors_io import is_quantized, load_compressed, save_compressed
from shrink.compress.finetune import mask_preserving_finetune
from shrink.compress.settings import calib_config, prune_method, skip_list
from shrink.compress.sparsity import sparsity
from shrink.context import StageContext
from common.errors import ShrinkError
from shrink.modeling import load_tokenizer, num_parameters, resolve_dtype
from shrink.stages import register_stage
from shrink.stages.import_model import cache_dir
from train.data import data_dir, load_packed
from train.loop import TrainConfig

CKPT_DIR = ".prune.ckpt"


def sparsity_metadata(model: torch.nn.Module, masks: dict[str, torch.Tensor], structure: str) -> dict:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {"structure": structure, "global_sparsity": zeros / max(total, 1), "targets": sorted(masks)}


@register_stage("prune")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    pcfg = cfg.prune
    method = prune_method(pcfg)
    skip = skip_list(pcfg, "prune")
    source = ctx.input
    if is_quantized(source.path):
        raise ShrinkError(f"input={source.path} is already quantized: prune before quantize")
    model = load_compressed(source.path, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    calib = calib_config(pcfg, "prune")
    ids = calibration_ids(calib, tokenizer, data_dir(cfg.get("data_dir")), "prune") if method.needs_data else None
    device = ctx.device
    print(f"prune: {method.method} {method.spec.structure} on {device}")
    report = compress_model(model, method, ids, device, skip=skip, on_indivisible=str(pcfg.on_indivisible),
                            batch_size=calib.batch_size, key="prune")
    if not report.masks:
        raise ShrinkError("prune: no linear was pruned (check prune.skip and prune.on_indivisible)")
    metrics = {"method": method.method, "structure": method.spec.structure, **report.summary(),
               "sparsity_of_pruned": sparsity_metadata(model, report.masks, method.spec.structure)["global_sparsity"]}
    ft = pcfg.finetune
    if bool(ft.enabled):
        teacher = load_compressed(source.path, dtype=torch.float32)
        data = load_packed(cfg.data, tokenizer, cfg.get("data_dir"), cache_dir(cfg))
        tc = TrainConfig.from_cfg(ft, seed=int(cfg.seed), block_size=data.train.shape[1])
        result = mask_preserving_finetune(model, teacher, report.masks, data.train, data.val, tc,
                                          ctx.run_dir / CKPT_DIR)
        model = result["model"].cpu()
        metrics["finetune"] = result["metrics"]
        del teacher
    meta = sparsity_metadata(model, report.masks, method.spec.structure)
    metrics["params"] = num_parameters(model)
    metrics["weight_sparsity_after"] = sum(sparsity(model.get_submodule(n).weight) for n in report.masks) / len(report.masks)
    dtype = resolve_dtype(str(pcfg.save_dtype))
    return write_artifact(ctx.output_dir("prune"), stage="prune",
                          save=lambda tmp: save_compressed(model, tmp, dtype=dtype, sparsity=meta, tokenizer=tokenizer),
                          config=ctx.resolved_config("prune"), inputs=[source], metrics=metrics, started=started)
