"""What a stage gets besides its config: the run directory, its input artifact, the teacher, the
shared data and cache directories; and the
checks every stage gets before any work (run dir writable and free, outputs ours to replace)."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from common.dirs import check_replaceable
from common.errors import ShrinkError
from common.paths import data_dir, default_cache_dir
from shrink.artifacts import META_FILE, Artifact
from shrink.verify import Verifier, check_model_files
from shrink.modeling import dir_size_bytes, resolve_device
from train.checkpoint import STATE_FILE

TEACHER_DIR = "teacher"
# The stages that transform a model, in pipeline order; a single stage without `input=` reads the
# latest artifact of the run that comes before it in this order.
PIPELINE_ORDER = ("import", "distill", "gqa", "prune", "quantize")


def artifact_dir_name(stage: str) -> str:
    return TEACHER_DIR if stage == "import" else stage


def checkpoint_dir_name(stage: str) -> str:
    return f".{stage}.ckpt"


def latest_artifact_before(run_dir: Path, stage: str) -> Artifact | None:
    """The run's latest artifact in pipeline order that precedes `stage` (None: none yet), leaving out
    any that its quality gate reverted (gates.action=revert)."""
    if stage not in PIPELINE_ORDER:
        return None
    for earlier in reversed(PIPELINE_ORDER[: PIPELINE_ORDER.index(stage)]):
        path = run_dir / artifact_dir_name(earlier)
        if (path / META_FILE).is_file():
            art = Artifact.load(path)
            if not art.reverted:
                return art
    return None


def cache_dir(cfg: DictConfig) -> Path:
    """`cache_dir=` (downloads, tokenized data, rationales), else $SHRINK_CACHE_DIR or ~/.cache/shrink."""
    return Path(str(cfg.cache_dir)) if cfg.get("cache_dir") else default_cache_dir()


@dataclass
class StageContext:
    cfg: DictConfig
    run_dir: Path
    inputs: list[Artifact] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return resolve_device(str(self.cfg.device))

    @property
    def data_dir(self) -> Path | None:
        return data_dir(self.cfg)

    @property
    def cache_dir(self) -> Path:
        return cache_dir(self.cfg)

    @property
    def stage(self) -> str:
        return str(self.cfg.stage.name)

    @property
    def input(self) -> Artifact:
        """The artifact this stage transforms: the previous one in the pipeline or `input=`; else the
        run's latest artifact before this stage in pipeline order; else the teacher, imported."""
        if not self.inputs:
            latest = latest_artifact_before(self.run_dir, self.stage)
            self.inputs = [latest if latest is not None else self.teacher()]
            print(f"{self.stage}: input {self.inputs[0].path} (the run's latest artifact before {self.stage} "
                  f"in pipeline order; set input= to choose another)")
        return self.inputs[0]

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


def planned_stages(cfg: DictConfig) -> list[str]:
    """The stages this command runs, the teacher import included when it may happen implicitly."""
    name = str(cfg.stage.name)
    names = [str(n) for n in cfg.stage.stages] if name == "pipeline" else [name]
    if not cfg.get("input") and any(n in PIPELINE_ORDER[1:] for n in names) and "import" not in names:
        names.insert(0, "import")
    return names


def check_outputs(run_dir: Path, stages: list[str]) -> None:
    """Before any work: every directory these stages will replace is absent or shrink's own."""
    for stage in stages:
        check_replaceable(run_dir / artifact_dir_name(stage), META_FILE)
        check_replaceable(run_dir / checkpoint_dir_name(stage), STATE_FILE)


def prepare_run_dir(value: str) -> Path:
    """The run directory, created and proven writable (a read-only place fails here, not after the work)."""
    run_dir = Path(value)
    if run_dir.exists() and not run_dir.is_dir():
        raise ShrinkError(f"run={value} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise ShrinkError(f"run={value} is not writable: {e.strerror or e}") from None
    return run_dir


def check_free_space(run_dir: Path, stages: list[str], source: Artifact | None) -> None:
    """Each model-writing stage writes about its input's size; refuse a disk that cannot hold that."""
    writers = [s for s in stages if s in PIPELINE_ORDER[1:]]
    if source is None or not writers:
        return
    needed = dir_size_bytes(source.path) * len(writers)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ShrinkError(f"run={run_dir}: {free / 2**20:,.0f} MiB free, but {', '.join(writers)} need about "
                          f"{needed / 2**20:,.0f} MiB (the size of {source.path}, per stage)")


def check_before_work(cfg: DictConfig, run_dir: Path) -> list[Artifact]:
    """What every stage checks before any work: `input=` complete, the outputs ours to replace, room on
    the disk, the input intact, the device present. Returns the `input=` artifact (or nothing)."""
    resolve_device(str(cfg.device))
    inputs = artifact_from_config(cfg.get("input"))
    stages = planned_stages(cfg)
    check_outputs(run_dir, stages)
    first = next((s for s in stages if s in PIPELINE_ORDER[1:]), None)
    source = inputs[0] if inputs else (latest_artifact_before(run_dir, first) if first else None)
    check_free_space(run_dir, stages, source)
    if source is not None:
        Verifier(run_dir).check(source, "input")
    return inputs


def artifact_from_config(value: str | None) -> list[Artifact]:
    """`input=`: an artifact whose model files are complete, checked before any work."""
    if not value:
        return []
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise ShrinkError(f"input={value}: no such artifact")
    artifact = Artifact.load(path)
    check_model_files(path, f"input={value}")
    return [artifact]
