"""Experiment tracking through wandb (offline by default; `logging=none` turns it off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class WandbTracker:
    def __init__(self, run: Any, log_every: int) -> None:
        self.run = run
        self.log_every = max(1, int(log_every))

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(logging_cfg: Any, run_dir: Path, name: str, config: dict) -> WandbTracker | None:
    if logging_cfg is None or logging_cfg.get("name") == "none" or logging_cfg.get("mode") == "disabled":
        return None
    import wandb

    run = wandb.init(project=str(logging_cfg.project), name=name, mode=str(logging_cfg.mode),
                     dir=str(run_dir), config=config, reinit="finish_previous")
    return WandbTracker(run, logging_cfg.get("log_every", 10))
