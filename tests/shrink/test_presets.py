"""The experiment presets compose, pass the config checks, and are what their names promise."""

from __future__ import annotations

import pytest

from shrink.__main__ import compose

EVERY_STAGE = ["import", "distill", "gqa", "prune", "quantize", "eval"]


@pytest.mark.parametrize("name", ["lossless", "balanced", "smallest", "demo"])
def test_preset_composes_and_passes_the_checks(name, tmp_path):
    cfg = compose([f"experiment={name}", f"run={tmp_path / 'run'}"])
    stages = list(cfg.stage.stages)
    assert stages[0] == "import" and stages[-1] == "eval"
    assert cfg.gates.action in ("revert", "warn", "stop")
    assert all(s in cfg.gates.max_ppl_ratio for s in stages if s in ("distill", "gqa", "prune", "quantize"))


def test_lossless_is_int8_only(tmp_path):
    cfg = compose(["experiment=lossless", f"run={tmp_path}"])
    assert list(cfg.stage.stages) == ["import", "quantize", "eval"]
    assert cfg.quantize.bits == 8


def test_balanced_is_a_distilled_depth_pruned_int4_student(tmp_path):
    cfg = compose(["experiment=balanced", f"run={tmp_path}"])
    assert list(cfg.stage.stages) == ["import", "distill", "quantize", "eval"]
    assert cfg.student.keep_layers.startswith("importance:") and cfg.quantize.bits == 4
    assert list(cfg.quantize.recipe) == ["rtn"] and cfg.data.teacher_generated.ratio > 0
    # its quantization-aware distillation trains onto the quantize stage's own grid
    assert dict(cfg.distill.qat) == {"bits": cfg.quantize.bits, "group_size": cfg.quantize.group_size,
                                     "symmetric": cfg.quantize.symmetric, "start": 0.0}


def test_smallest_and_demo_run_every_stage(tmp_path):
    smallest = compose(["experiment=smallest", f"run={tmp_path}"])
    assert list(smallest.stage.stages) == EVERY_STAGE and smallest.prune.structure == "2:4"
    demo = compose(["experiment=demo", f"run={tmp_path}"])
    assert list(demo.stage.stages) == EVERY_STAGE
    assert demo.student.keep_layers == "importance:28" and demo.quantize.bits == 8  # removes layers, quantizes
    assert demo.gates.max_ppl_ratio.prune == 1.1 and demo.gqa.mode == "keep"  # the preset's keys win over defaults
