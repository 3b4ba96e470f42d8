"""`python -m shrink stage=<name> key=value ...`: compose the Hydra config, look the stage up, run it.

We compose the config with Hydra's compose API rather than `@hydra.main`, so that every error meant
for the user (unknown stage or key, missing required value, bad value, ShrinkError) prints as one
line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USAGE = """usage: python -m shrink stage=<name> [group=option ...] [key=value ...] [--cfg]

  stage=pipeline|import|distill|gqa|prune|quantize|eval   (default: pipeline)
  groups: teacher=, student=, data=, logging=, experiment=   (see conf/)
  --cfg   print the composed config and exit
"""
_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=",
          "Set the environment variable", "To append to your config")


def one_line(message: str) -> str:
    """Hydra/OmegaConf messages span many lines; keep what names the problem, on one line."""
    lines = [ln.strip() for ln in str(message).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    return " ".join(kept)[:600]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        from common.errors import ShrinkError

        raise ShrinkError(f"missing required value: {', '.join(missing)} (set it on the command line, "
                          f"e.g. {missing[0]}=...)")
    OmegaConf.resolve(cfg)
    from shrink.config_check import check_config

    check_config(cfg)
    return cfg


def run(cfg):
    """Every stage starts here: the checks that need no model run first, under the run dir's lock."""
    from contextlib import nullcontext

    from common.dirs import dir_lock
    from shrink.context import (PIPELINE_ORDER, StageContext, artifact_from_config, check_free_space, check_outputs,
                                latest_artifact_before, planned_stages, prepare_run_dir)
    from shrink.stages import get_stage

    name = str(cfg.stage.name)
    stage = get_stage(name)
    run_dir = prepare_run_dir(str(cfg.run))
    # Under `accelerate launch` every rank runs this; rank 0 holds the lock for all of them.
    main_rank = os.environ.get("RANK", "0") == "0"
    with dir_lock(run_dir, f"run={cfg.run}") if main_rank else nullcontext():
        inputs = artifact_from_config(cfg.get("input"))
        stages = planned_stages(cfg)
        check_outputs(run_dir, stages)
        first = next((s for s in stages if s in PIPELINE_ORDER[1:]), None)
        source = inputs[0] if inputs else (latest_artifact_before(run_dir, first) if first else None)
        check_free_space(run_dir, stages, source)
        return stage(cfg, StageContext(cfg=cfg, run_dir=run_dir, inputs=inputs))


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from common.errors import ShrinkError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    flags = [a for a in argv if a.startswith("--")]
    unknown = [f for f in flags if f != "--cfg"]
    if unknown:
        print(f"error: unknown option {unknown[0]} (see --help)", file=sys.stderr)
        return 2
    try:
        cfg = compose([a for a in argv if not a.startswith("--")])
        if "--cfg" in flags:
            print(OmegaConf.to_yaml(cfg))
            return 0
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would bury the stage's own output
        result = run(cfg)
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: config: {one_line(e)}", file=sys.stderr)
        return 2
    if result is not None and hasattr(result, "path"):
        print(f"{cfg.stage.name}: wrote {result.path}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
