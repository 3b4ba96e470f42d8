"""stage=pipeline: run the configured stages in order, each on the previous stage's artifact."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from shrink.artifacts import Artifact
from shrink.context import StageContext
from shrink.quality_gate import gate_stage
from shrink.stages import get_stage, register_stage


@register_stage("pipeline")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact | None:
    names = [str(n) for n in cfg.stage.stages]
    stages = [(name, get_stage(name)) for name in names]  # unknown names fail before any work
    previous = ctx.inputs
    result = None
    for name, stage in stages:
        stage_cfg = cfg.copy()
        OmegaConf.set_struct(stage_cfg, False)
        stage_cfg.stage = {"name": name}
        OmegaConf.set_struct(stage_cfg, True)
        print(f"pipeline: stage {name}")
        stage_ctx = StageContext(stage_cfg, ctx.run_dir, inputs=list(previous))
        result = stage(stage_cfg, stage_ctx)
        gate = None
        if result is not None and stage_ctx.inputs:
            gate = gate_stage(stage_cfg, name, stage_ctx.inputs[0], result)
        if gate is not None and gate["reverted"]:  # the next stage takes this one's input
            continue
        if result is not None and result.meta.get("stage") not in ("eval",):
            previous = [result]
    return result
