"""stage=import: bring the teacher (embedded, GGUF, local dir or hub id) into the run as an artifact."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from shrink.artifacts import Artifact
from shrink.context import TEACHER_DIR, StageContext
from shrink.modeling import num_parameters, resolve_dtype, save_model_artifact
from common.paths import default_cache_dir
from shrink.sources import load_source
from shrink.stages import register_stage


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.get("cache_dir") else default_cache_dir()


@register_stage("import")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    source = str(cfg.teacher.source)
    dtype = resolve_dtype(str(cfg.teacher.dtype))
    model, tokenizer = load_source(source, cache_dir(cfg), dtype)
    metrics = {"params": num_parameters(model), "source": source}
    return save_model_artifact(ctx.run_dir / TEACHER_DIR, model, tokenizer, stage="import",
                               config=ctx.resolved_config("teacher"), metrics=metrics, started=started)
