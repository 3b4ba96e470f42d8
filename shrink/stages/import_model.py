"""stage=import: bring the teacher (embedded, GGUF, local dir or hub id) into the run as an artifact."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from shrink.artifacts import Artifact
from shrink.context import TEACHER_DIR, StageContext
from shrink.modeling import num_parameters, resolve_dtype, save_model_artifact
from shrink.sources import load_source
from shrink.stages import register_stage


def import_model(source: str, dtype: str, *, dest: Path, cache_dir: Path, config: dict | None = None) -> Artifact:
    """Load `source` (see shrink/sources.py) in `dtype` and save it as an artifact at `dest`."""
    started = time.time()
    model, tokenizer = load_source(source, cache_dir, resolve_dtype(dtype))
    metrics = {"params": num_parameters(model), "source": source}
    return save_model_artifact(dest, model, tokenizer, stage="import", config=config, metrics=metrics,
                               started=started)


@register_stage("import")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    return import_model(str(cfg.teacher.source), str(cfg.teacher.dtype), dest=ctx.run_dir / TEACHER_DIR,
                        cache_dir=ctx.cache_dir, config=ctx.resolved_config("teacher"))
