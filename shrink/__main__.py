"""`python -m shrink stage=<name> key=value ...`: compose the Hydra config, look the stage up, run it.

We compose the config with Hydra's compose API rather than `@hydra.main`, so that every error meant
for the user (unknown stage or key, missing required value, bad value, ShrinkError) prints as one
line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USAGE = """usage: python -m shrink [-m] stage=<name> [group=option ...] [key=value ...] [--cfg job|hydra|all] [--info]

  stage=pipeline|import|distill|gqa|prune|quantize|eval   (default: pipeline)
  groups: teacher=, student=, data=, logging=, experiment=   (see conf/)
  --cfg, -c job|hydra|all    print the composed config (job: ours, hydra: Hydra's, all: both) and exit
  --resolve                  with --cfg: resolve interpolations first
  --info, -i [all|config|defaults|defaults-tree|plugins|searchpath]   Hydra's information and exit
  --multirun, -m             a sweep: a=1,2 b=x,y runs one job per combination, job N in <run>/N
"""
CFG_KINDS = ("job", "hydra", "all")
INFO_KINDS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
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
    from shrink.context import prepare_run_dir
    from shrink.launch import check_launch, prepared_context
    from shrink.stages import get_stage

    stage = get_stage(str(cfg.stage.name))
    check_launch(cfg)
    run_dir = prepare_run_dir(str(cfg.run))
    # Under `accelerate launch` every rank runs this; rank 0 holds the lock and writes for all of them.
    main_rank = os.environ.get("RANK", "0") == "0"
    with dir_lock(run_dir, f"run={cfg.run}") if main_rank else nullcontext():
        ctx = prepared_context(cfg, run_dir)
        result = stage(cfg, ctx)
        if result is not None and ctx.inputs and main_rank:
            from shrink.quality_gate import gate_stage

            gate_stage(cfg, str(cfg.stage.name), ctx.inputs[0], result)
        return result


@dataclass
class Flags:
    cfg: str | None = None
    info: str | None = None
    resolve: bool = False
    multirun: bool = False
    overrides: list[str] = field(default_factory=list)


def parse_flags(argv: list[str]) -> Flags:
    """Hydra's command-line flags (ShrinkError for an unknown one or a bad choice); the rest are overrides."""
    from common.errors import ShrinkError

    flags, i = Flags(), 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in ("--cfg", "-c", "--info", "-i"):
            kinds = CFG_KINDS if name in ("--cfg", "-c") else INFO_KINDS
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if not value and nxt and "=" not in nxt and not nxt.startswith("-"):  # `--cfg job`
                value, i = nxt, i + 1
            value = value or kinds[0]
            if value not in kinds:
                raise ShrinkError(f"{name} {value}: expected one of {', '.join(kinds)}")
            setattr(flags, "cfg" if kinds is CFG_KINDS else "info", value)
        elif arg == "--resolve":
            flags.resolve = True
        elif arg in ("-m", "--multirun"):
            flags.multirun = True
        elif arg.startswith("-"):
            raise ShrinkError(f"unknown option {arg} (see --help)")
        else:
            flags.overrides.append(arg)
        i += 1
    return flags


def show(flags: Flags) -> None:
    """--cfg / --info, printed by Hydra itself (composition errors still become one line)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        if flags.info:
            hydra.show_info(info=flags.info, config_name="config", overrides=flags.overrides)
        else:
            hydra.show_cfg(config_name="config", overrides=flags.overrides, cfg_type=flags.cfg, package=None,
                           resolve=flags.resolve)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """One override list per combination of the swept values (a=1,2 b=x,y: four jobs), as Hydra's
    basic sweeper orders them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def multirun(overrides: list[str]) -> None:
    """Every job's config is composed and checked before the first one runs; job N runs in <run>/N."""
    jobs = sweep_jobs(overrides)
    configs = [compose(job) for job in jobs]
    quiet_weight_loading()
    for num, (job, cfg) in enumerate(zip(jobs, configs)):
        cfg.run = str(Path(str(cfg.run)) / str(num))
        print(f"multirun: job {num} of {len(jobs)}: {' '.join(job)} -> run={cfg.run}", flush=True)
        report(cfg, run(cfg))


def quiet_weight_loading() -> None:
    """Weight-loading bars would bury the stage's own output. Called once the config is checked:
    transformers (and torch with it) is imported only then, so a bad config is refused before either."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def report(cfg, result) -> None:
    if result is not None and hasattr(result, "path"):
        print(f"{cfg.stage.name}: wrote {result.path}")


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from common.errors import ShrinkError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        flags = parse_flags(argv)
        if flags.cfg or flags.info:
            show(flags)
            return 0
        if flags.multirun:
            multirun(flags.overrides)
        else:
            cfg = compose(flags.overrides)
            quiet_weight_loading()
            report(cfg, run(cfg))
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: config: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
