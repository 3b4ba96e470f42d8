"""What a stage gets besides its config: the run directory, its input artifact, the teacher."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from shrink.artifacts import Artifact
from common.errors import ShrinkError
from shrink.modeling import resolve_device

TEACHER_DIR = "teacher"


@dataclass
class StageContext:
    cfg: DictConfig
    run_dir: Path
    inputs: list[Artifact] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return resolve_device(str(self.cfg.device))

    @property
    def input(self) -> Artifact:
        """The artifact this stage transforms: the previous one in the pipeline, `input=...`,
        or the teacher when nothing else is given."""
        return self.inputs[0] if self.inputs else self.teacher()

    def teacher(self) -> Artifact:
        """The run's teacher artifact, imported on first use."""
        path = self.run_dir / TEACHER_DIR
        if (path / "shrink.json").is_file():
            return Artifact.load(path)
        from shrink.stages import get_stage

        return get_stage("import")(self.cfg, StageContext(self.cfg, self.run_dir))

    def output_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def resolved_config(self, *keys: str) -> dict:
        """The parts of the config a stage's artifact records (always the stage and seed)."""
        out = {"stage": str(self.cfg.stage.name), "seed": int(self.cfg.seed)}
        for key in keys:
            if key in self.cfg:
                out[key] = OmegaConf.to_container(self.cfg[key], resolve=True)
        return out


def artifact_from_config(value: str | None) -> list[Artifact]:
    if not value:
        return []
    path = Path(value)
    if not path.exists():
        raise ShrinkError(f"input={value}: no such artifact")
    return [Artifact.load(path)]
