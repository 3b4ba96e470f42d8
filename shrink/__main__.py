"""`python -m shrink stage=<name> ...`: resolve the Hydra config, look the stage up, run it.

Errors meant for users (ShrinkError, bad config values) print as one line and exit with 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Hydra prints a one-line message for unknown config keys/groups unless this asks for the trace.
os.environ.setdefault("HYDRA_FULL_ERROR", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from shrink.errors import ShrinkError  # noqa: E402

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("shrink")


def run(cfg: DictConfig):
    from shrink.context import StageContext, artifact_from_config
    from shrink.stages import get_stage

    stage = get_stage(str(cfg.stage.name))
    run_dir = Path(str(cfg.run))
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cfg=cfg, run_dir=run_dir, inputs=artifact_from_config(cfg.get("input")))
    return stage(cfg, ctx)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        OmegaConf.resolve(cfg)  # missing required values (???) fail here, before any work
        result = run(cfg)
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0]
        key = getattr(e, "full_key", None)
        print(f"error: config: {first}" + (f" (key: {key})" if key and key not in first else ""), file=sys.stderr)
        sys.exit(2)
    if result is not None and hasattr(result, "path"):
        print(f"{cfg.stage.name}: wrote {result.path}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
