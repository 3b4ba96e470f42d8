"""One command run as several processes (`accelerate launch`, torchrun): which stages may run so,
and the order in which the ranks touch the run directory.

Rank 0 alone holds the run directory's lock, checks the inputs (writing the verification stamps),
imports the teacher when the run has none, writes the artifact and gates it; the other ranks wait
for its checks, then only read. If rank 0 stops (a bad input, the lock held by another command),
the launcher ends the waiting ranks: they never start work of their own.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from common.errors import ShrinkError
from shrink.context import PIPELINE_ORDER, StageContext, artifact_from_config, check_before_work
from train.distributed import launched_world_size, process_state

# Stages whose work is split across processes; every other stage would only repeat it on each rank.
DISTRIBUTED_STAGES = ("distill",)


def check_launch(cfg: DictConfig) -> None:
    """Before any work: under a launcher of several processes, the stage must be one that trains
    across them."""
    world = launched_world_size()
    name = str(cfg.stage.name)
    if world > 1 and name not in DISTRIBUTED_STAGES:
        raise ShrinkError(f"stage={name} was launched as {world} processes, but only "
                          f"{', '.join(f'stage={s}' for s in DISTRIBUTED_STAGES)} trains across processes; "
                          f"run stage={name} as one process (python -m shrink stage={name} ...)")


def is_main_rank() -> bool:
    return launched_world_size() == 1 or process_state().is_main_process


def prepared_context(cfg: DictConfig, run_dir: Path) -> StageContext:
    """The stage's context after the checks every stage gets before any work (see the module doc)."""
    if launched_world_size() == 1:
        return StageContext(cfg=cfg, run_dir=run_dir, inputs=check_before_work(cfg, run_dir))
    state = process_state()
    ctx = None
    if state.is_main_process:
        ctx = StageContext(cfg=cfg, run_dir=run_dir, inputs=check_before_work(cfg, run_dir))
        _resolve_input(ctx)
    state.wait_for_everyone()
    if ctx is None:
        ctx = StageContext(cfg=cfg, run_dir=run_dir, inputs=artifact_from_config(cfg.get("input")))
        _resolve_input(ctx)  # what rank 0 chose (or imported) is there now
    return ctx


def _resolve_input(ctx: StageContext) -> None:
    if ctx.stage in PIPELINE_ORDER[1:]:
        ctx.input
