"""conf/train/default.yaml is the one training group: its values are TrainConfig's defaults, and
distill, gqa.train and prune.finetune are composed from it (same keys, their own overrides)."""

from __future__ import annotations

import dataclasses

import yaml

from support import REPO
from train.config import TrainConfig

STAGE_OWN = {"max_steps", "losses", "seed", "prefix"}  # each stage sets its budget and its losses


def test_train_group_equals_the_dataclass_defaults():
    group = yaml.safe_load((REPO / "conf" / "train" / "default.yaml").read_text())
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)}
    assert set(group) == set(defaults) - STAGE_OWN
    assert group == {k: v for k, v in defaults.items() if k in group}


def test_distill_gqa_and_prune_finetune_compose_the_group():
    from shrink.__main__ import compose

    cfg = compose(["distill.lr=1e-3", "gqa.train.chunk_size=512", "prune.finetune.top_k=4"])
    group = set(yaml.safe_load((REPO / "conf" / "train" / "default.yaml").read_text()))
    assert group <= set(cfg.distill) and group <= set(cfg.gqa.train) and group <= set(cfg.prune.finetune)
    assert (cfg.distill.lr, cfg.gqa.train.chunk_size, cfg.prune.finetune.top_k) == (1e-3, 512, 4)
    # each stage keeps what differs from the group
    assert (cfg.distill.warmup_steps, cfg.gqa.train.warmup_steps, cfg.prune.finetune.warmup_steps) == (50, 20, 20)
    assert dict(cfg.prune.finetune.losses) == {"forward_kl": 1.0} and cfg.prune.finetune.lr == 2e-5
    assert dict(cfg.distill.losses) == {"forward_kl": 1.0, "ce": 0.5} and cfg.gqa.train.temperature == 1.0
