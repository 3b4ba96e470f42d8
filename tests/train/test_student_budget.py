"""Student by budget: the largest depth or width that meets student.target_params."""

from __future__ import annotations

import pytest
from support import tiny_llama_config

from common.errors import ShrinkError
from train.student_init import count_params, prune_width, shape_for_budget, student_from_teacher


def real_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def test_count_params_is_exact():
    model = teacher()
    assert count_params(model.config) == real_params(model)


def test_depth_budget_is_met_by_the_largest_student():
    model = teacher()
    full = real_params(model)
    target = int(full * 0.8)
    shape = shape_for_budget(model.config, target, "depth")
    student = student_from_teacher(model, list(range(shape["layers"])))
    assert real_params(student) == shape["params"] <= target
    if shape["layers"] + 1 < model.config.num_hidden_layers:
        assert real_params(student_from_teacher(model, list(range(shape["layers"] + 1)))) > target


def test_width_budget_keeps_every_layer_and_meets_the_target():
    model = teacher()
    target = int(real_params(model) * 0.85)
    shape = shape_for_budget(model.config, target, "width")
    assert shape["layers"] == model.config.num_hidden_layers
    student = prune_width(model, intermediate_size=shape["intermediate_size"])
    assert real_params(student) == shape["params"] <= target
    wider = prune_width(model, intermediate_size=shape["intermediate_size"] + 8)
    assert real_params(wider) > target  # the widest MLP that fits


def test_impossible_or_bad_budgets_name_the_key():
    config = teacher().config
    with pytest.raises(ShrinkError, match="student.target_params"):
        shape_for_budget(config, count_params(config) + 1, "depth")
    with pytest.raises(ShrinkError, match="student.target_params"):
        shape_for_budget(config, 10, "width")
    with pytest.raises(ShrinkError, match="student.budget_by"):
        shape_for_budget(config, 1000, "height")


@pytest.mark.parametrize("by", ["depth", "width"])
def test_distill_stage_builds_the_student_of_the_budget(tiny_teacher, tmp_path, by):
    import json

    from support import run_cli

    from shrink.modeling import load_model

    full = real_params(load_model(tiny_teacher))
    target = int(full * 0.8)
    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=importance",
                     f"student.target_params={target}", f"student.budget_by={by}", "student.calib_blocks=2",
                     "distill.max_steps=1", "logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64",
                     "distill.batch_size=2", "distill.checkpoint_every=0", "distill.save_dtype=fp32",
                     "distill.val_batches=1", f"cache_dir={tmp_path / 'cache'}", "gates.context=32")
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "distill" / "shrink.json").read_text())["metrics"]
    assert m["budget"]["by"] == by and m["params"] == m["budget"]["params"] <= target
