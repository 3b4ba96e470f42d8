"""Student by budget: the largest depth, width or both student that meets student.target_params,
target_bytes or target_latency_ms (shrink/student_budget.py), and the distill stage building it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from support import tiny_llama_config

from common.errors import SettingError, ShrinkError
from shrink.stages.distill import StudentSpec
from shrink.student_budget import (ParamCounter, Shape, cached_latency, choose_shape, count_params, engine_decode_ms,
                                   family, width_at, width_step)
from train.student_init import prune_width, student_from_teacher


def real_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def built(model, choice: dict):
    """The student of a choice, built the way the stage builds it (first layers: importance picks
    which layers, not how many)."""
    student = student_from_teacher(model, list(range(choice["layers"])))
    return prune_width(student, choice["hidden_size"], choice["intermediate_size"],
                       num_attention_heads=choice["num_attention_heads"])


def test_count_params_is_exact():
    model = teacher()
    assert count_params(model.config) == real_params(model)
    count = ParamCounter(model.config)
    for shape in [Shape(1, 64, 128, 4), Shape(3, 40, 80, 2), Shape(4, 64, 128, 4)]:
        assert count(shape) == count_params(shape.apply(model.config))


def test_depth_budget_is_met_by_the_largest_student():
    model = teacher()
    full = real_params(model)
    target = int(full * 0.8)
    shape = choose_shape(model.config, "target_params", target, "depth")
    student = student_from_teacher(model, list(range(shape["layers"])))
    assert real_params(student) == shape["params"] <= target
    if shape["layers"] + 1 < model.config.num_hidden_layers:
        assert real_params(student_from_teacher(model, list(range(shape["layers"] + 1)))) > target


def test_width_budget_keeps_every_layer_and_meets_the_target():
    model = teacher()
    target = int(real_params(model) * 0.85)
    shape = choose_shape(model.config, "target_params", target, "width")
    assert shape["layers"] == model.config.num_hidden_layers
    assert shape["hidden_size"] < model.config.hidden_size
    assert shape["intermediate_size"] < model.config.intermediate_size
    student = prune_width(model, shape["hidden_size"], shape["intermediate_size"])
    assert real_params(student) == shape["params"] <= target
    step = width_at(model.config, shape["layers"], shape["hidden_size"] + width_step(shape["num_attention_heads"]),
                 shape["num_attention_heads"])
    wider = prune_width(model, step.hidden_size, step.intermediate_size)
    assert real_params(wider) > target  # the widest that fits
    assert real_params(prune_width(model, shape["hidden_size"], shape["intermediate_size"] + 8)) > target  # MLP filled


def test_both_splits_the_removal_between_depth_and_width():
    model = teacher()
    full = real_params(model)
    target = int(full * 0.6)
    choice = choose_shape(model.config, "target_params", target, "both")
    assert choice["layers"] < model.config.num_hidden_layers and choice["hidden_size"] < model.config.hidden_size
    assert real_params(built(model, choice)) == choice["params"] <= target
    # The depth: the layer count whose removal alone is nearest to half of the removal.
    by_layers = {n: real_params(student_from_teacher(model, list(range(n)))) for n in range(1, 5)}
    nearest = min(by_layers, key=lambda n: (abs(full - by_layers[n] - (full - target) / 2), -n))
    assert choice["layers"] == nearest
    step = width_at(model.config, choice["layers"], choice["hidden_size"] + width_step(choice["num_attention_heads"]),
                 choice["num_attention_heads"])
    assert real_params(built(model, {**choice, **dataclasses.asdict(step)})) > target


def test_byte_budget_counts_the_saved_dtype_and_tied_weights_once(tmp_path):
    from safetensors import safe_open

    from shrink.modeling import save_model_artifact
    from support import make_tiny_tokenizer

    model = teacher()
    target = int(real_params(model) * 2 * 0.7)  # bytes at bf16
    choice = choose_shape(model.config, "target_bytes", target, "width", save_dtype=torch.bfloat16)
    assert choice["bytes"] == 2 * choice["params"] <= target
    save_model_artifact(tmp_path / "s", built(model, choice), make_tiny_tokenizer(), stage="test", dtype="bf16")
    saved = 0
    for f in (tmp_path / "s").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            saved += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
    assert saved == choice["bytes"]
    step = width_at(model.config, choice["layers"], choice["hidden_size"] + width_step(choice["num_attention_heads"]),
                 choice["num_attention_heads"])
    assert 2 * count_params(step.apply(model.config)) > target  # one width step more misses the budget
    # fp32 halves the parameters the same bytes buy
    fp32 = choose_shape(model.config, "target_bytes", target, "width", save_dtype=torch.float32)
    assert fp32["params"] < choice["params"]


@pytest.mark.parametrize("by", ["depth", "width", "both"])
def test_latency_budget_picks_the_largest_candidate_that_measures_within(by):
    """A fake timer (ms = parameters / 1000) makes the choice deterministic; bisection measures few."""
    config = tiny_llama_config()
    calls = []

    def fake_ms(cfg) -> float:
        calls.append(cfg)
        return count_params(cfg) / 1000

    target = 0.7 * count_params(config) / 1000
    choice = choose_shape(config, "target_latency_ms", target, by, measure=fake_ms)
    count = ParamCounter(config)
    shapes = family(config, by, config.num_attention_heads, count)
    chosen = Shape(choice["layers"], choice["hidden_size"], choice["intermediate_size"], choice["num_attention_heads"])
    i = shapes.index(chosen)
    assert count(chosen) / 1000 <= target
    assert i + 1 == len(shapes) or count(shapes[i + 1]) / 1000 > target  # the next larger candidate misses it
    assert len(calls) <= math.ceil(math.log2(len(shapes))) + 1
    assert {(m["layers"], m["hidden_size"]) for m in choice["measured"]} >= {(chosen.layers, chosen.hidden_size)}


def test_cached_latency_measures_each_shape_once_so_reruns_choose_alike(tmp_path):
    config = tiny_llama_config()
    calls = []

    def fake_ms(cfg) -> float:
        calls.append(cfg.hidden_size)
        return count_params(cfg) / 1000

    target = 0.7 * count_params(config) / 1000
    first = choose_shape(config, "target_latency_ms", target, "width", measure=cached_latency(tmp_path, "cpu", fake_ms))
    n = len(calls)
    again = choose_shape(config, "target_latency_ms", target, "width",
                         measure=cached_latency(tmp_path, "cpu", lambda cfg: pytest.fail("measured again")))
    assert again == first and n == len(list((tmp_path / "latency").glob("*.json"))) > 0


def test_latency_budget_too_small_names_the_key():
    config = tiny_llama_config()
    with pytest.raises(ShrinkError, match=r"student.target_latency_ms=0.001: the smallest depth student"):
        choose_shape(config, "target_latency_ms", 0.001, "depth", measure=lambda cfg: 1.0)


def test_engine_decode_ms_times_a_dummy_model_with_the_given_clock():
    ticks = iter(range(100))
    ms = engine_decode_ms(tiny_llama_config(), "cpu", new_tokens=8, warmup_tokens=2, repeats=3,
                          clock=lambda: 0.25 * next(ticks))
    assert ms == pytest.approx(1000 * 0.25 / 8)  # each timed decode: one clock step
    assert engine_decode_ms(tiny_llama_config(), "cpu", new_tokens=4, warmup_tokens=2, repeats=1) > 0


def test_impossible_or_bad_budgets_name_the_key():
    config = teacher().config
    with pytest.raises(ShrinkError, match="student.target_params"):
        choose_shape(config, "target_params", count_params(config) + 1, "depth")
    with pytest.raises(ShrinkError, match="student.target_params"):
        choose_shape(config, "target_params", 10, "width")
    with pytest.raises(ShrinkError, match="student.target_bytes"):
        choose_shape(config, "target_bytes", 2 * count_params(config), "width")
    with pytest.raises(ShrinkError, match="student.budget_by"):
        choose_shape(config, "target_params", 1000, "height")


@pytest.mark.parametrize("kwargs, message", [
    ({"target_params": 1000, "target_bytes": 2000}, r"student.target_params, student.target_bytes: set at most one"),
    ({"target_bytes": 1, "target_latency_ms": 2.0}, r"student.target_bytes, student.target_latency_ms"),
    ({"target_params": 0}, r"student.target_params must be > 0, got 0"),
    ({"target_latency_ms": -1.0}, r"student.target_latency_ms must be > 0, got -1.0"),
    ({"target_params": 1000, "budget_by": "height"}, r"student.budget_by: expected one of depth, width, both"),
    ({"target_params": 1000, "init": "config"}, r"student.target_params needs student.init=teacher_layers"),
    ({"target_bytes": 1000, "width": {"hidden_size": 32}}, r"leave student.width.hidden_size unset"),
])
def test_student_spec_refuses_bad_budgets(kwargs, message):
    with pytest.raises(SettingError, match=message):
        StudentSpec(**kwargs)


def test_resolve_turns_the_budget_into_layers_and_width():
    config = tiny_llama_config()
    spec = StudentSpec(keep_layers="every:2", target_params=int(count_params(config) * 0.6), budget_by="both")
    resolved = spec.resolve(config)
    assert resolved.keep_layers == f"importance:{resolved.budget['layers']}"
    assert resolved.width["hidden_size"] == resolved.budget["hidden_size"] < config.hidden_size
    assert "num_attention_heads" not in resolved.width  # heads stay unless fixed
    assert resolved.resolve(config) is resolved
    assert StudentSpec().resolve(config) == StudentSpec()


@pytest.mark.parametrize("by, key", [("depth", "target_params"), ("width", "target_bytes"), ("both", "target_params")])
def test_distill_stage_builds_the_student_of_the_budget(tiny_teacher, tmp_path, by, key):
    from support import run_main

    from shrink.modeling import load_model

    full = real_params(load_model(tiny_teacher))
    target = int(full * 0.8) * (4 if key == "target_bytes" else 1)  # bytes at fp32
    result = run_main("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=importance",
                      f"student.{key}={target}", f"student.budget_by={by}", "student.calib_blocks=2",
                      "distill.max_steps=1", "logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64",
                      "distill.batch_size=2", "distill.checkpoint_every=0", "distill.save_dtype=fp32",
                      "distill.val_batches=1", f"cache_dir={tmp_path / 'cache'}", "gates.context=32")
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "distill" / "shrink.json").read_text())["metrics"]
    assert m["budget"]["by"] == by and m["budget"]["key"] == key
    assert m["params"] == m["budget"]["params"] and m["budget"]["bytes"] == 4 * m["params"]
    assert m["budget"][{"target_params": "params", "target_bytes": "bytes"}[key]] <= target


def test_two_budgets_fail_before_any_work(tiny_teacher, tmp_path):
    from support import run_cli

    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=importance",
                     "student.target_params=1000", "student.target_latency_ms=5", "logging=none")
    assert result.returncode != 0
    assert "student.target_params, student.target_latency_ms: set at most one budget" in result.stderr
    assert not (tmp_path / "distill").exists()


@pytest.mark.slow
@pytest.mark.parametrize("by", ["depth", "width", "both"])
def test_real_teacher_budget_of_60_percent(smollm2_artifact, by, tmp_path):
    """SmolLM2-135M at 60% of its parameters: each kind meets the target within one step."""
    from shrink.modeling import load_model

    model = load_model(smollm2_artifact, dtype="fp32")
    full = real_params(model)
    target = int(full * 0.6)
    choice = choose_shape(model.config, "target_params", target, by)
    student = built(model, choice)
    assert real_params(student) == choice["params"] <= target
    if by == "depth":
        bigger = dataclasses.replace(Shape.of(student.config), layers=choice["layers"] + 1)
    else:
        bigger = width_at(model.config, choice["layers"], choice["hidden_size"] + width_step(choice["num_attention_heads"]),
                 choice["num_attention_heads"])
    assert count_params(bigger.apply(model.config)) > target
    out = student(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert out.shape == (1, 4, model.config.vocab_size) and torch.isfinite(out).all()
    student.save_pretrained(tmp_path, safe_serialization=True)  # 9 heads: a hidden size of 408 did not save


@pytest.mark.slow
def test_real_teacher_byte_and_latency_budgets(smollm2_artifact):
    """SmolLM2-135M: a bf16 byte budget and a latency budget (fake timer: ms = parameters / 1e6) each
    met within one step of their family."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_artifact)
    full = count_params(config)
    target_bytes = int(2 * full * 0.5)
    choice = choose_shape(config, "target_bytes", target_bytes, "width", save_dtype=torch.bfloat16)
    assert choice["bytes"] <= target_bytes
    step = width_at(config, choice["layers"], choice["hidden_size"] + width_step(choice["num_attention_heads"]),
                 choice["num_attention_heads"])
    assert 2 * count_params(step.apply(config)) > target_bytes
    target_ms = 0.6 * full / 1e6
    choice = choose_shape(config, "target_latency_ms", target_ms, "both", measure=lambda cfg: count_params(cfg) / 1e6)
    count = ParamCounter(config)
    shapes = family(config, "both", config.num_attention_heads, count)
    chosen = Shape(choice["layers"], choice["hidden_size"], choice["intermediate_size"], choice["num_attention_heads"])
    i = shapes.index(chosen)
    assert count(chosen) / 1e6 <= target_ms < count(shapes[i + 1]) / 1e6
    assert len(choice["measured"]) <= 7  # bisection over the 1/64 grid


def test_distill_stage_latency_budget_measures_with_the_engine(tiny_teacher, tmp_path):
    """A latency budget every candidate meets: the largest depth student (3 of 4 layers), chosen from
    real engine timings on the CPU, recorded with the measurements."""
    from support import run_main

    result = run_main("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=importance",
                      "student.target_latency_ms=100000", "student.budget_by=depth", "student.calib_blocks=2",
                      "distill.max_steps=1", "logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64",
                      "distill.batch_size=2", "distill.checkpoint_every=0", "distill.val_batches=1",
                      f"cache_dir={tmp_path / 'cache'}", "gates.context=32")
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "distill" / "shrink.json").read_text())["metrics"]
    assert m["budget"]["key"] == "target_latency_ms" and m["budget"]["layers"] == 3 and len(m["kept_layers"]) == 3
    assert m["budget"]["measured"] and all(0 < r["ms_per_token"] <= 100000 for r in m["budget"]["measured"])
    assert "ms/token on cpu" in result.stdout


def test_fixed_heads_count_in_every_candidate_of_the_budget():
    model = teacher()
    target = int(real_params(model) * 0.7)
    spec = StudentSpec(target_params=target, budget_by="width", width={"num_attention_heads": 2}).resolve(model.config)
    assert spec.budget["num_attention_heads"] == spec.width["num_attention_heads"] == 2
    student = built(model, spec.budget)
    assert real_params(student) == spec.budget["params"] <= target
    assert student.config.num_key_value_heads == 2 and student.config.head_dim == 16
    # fewer heads leave room for a wider student than the same budget with every head
    assert spec.budget["hidden_size"] >= choose_shape(model.config, "target_params", target, "width")["hidden_size"]


@pytest.mark.parametrize("by", ["width", "both"])
def test_width_candidates_keep_the_hidden_size_a_multiple_of_the_heads(tmp_path, by):
    """3 heads (SmolLM2 has 9): every hidden size tried is a multiple of 8 and of the heads, and the
    chosen student saves; transformers refused a 408-wide student of 9 heads at its save, after the
    GPU had trained it for 10M tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=96, num_attention_heads=3,
                                                               num_key_value_heads=1, head_dim=32)).eval()
    count = ParamCounter(model.config)
    shapes = family(model.config, by, 3, count)
    assert shapes and all(s.hidden_size % 24 == 0 for s in shapes)
    target = int(real_params(model) * 0.6)
    choice = choose_shape(model.config, "target_params", target, by)
    student = built(model, choice)
    assert real_params(student) == choice["params"] <= target
    # the coarse hidden step (24 channels) leaves a gap the MLP fills: one MLP step more misses the budget
    assert choice["intermediate_size"] == model.config.intermediate_size or \
        count(Shape(choice["layers"], choice["hidden_size"], choice["intermediate_size"] + 8, 3)) > target
    student.save_pretrained(tmp_path, safe_serialization=True)


def test_prune_width_refuses_a_hidden_size_the_heads_do_not_divide():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=96, num_attention_heads=3,
                                                               num_key_value_heads=1, head_dim=32))
    with pytest.raises(ShrinkError, match=r"student.width.hidden_size: the hidden size 88 must be a multiple of the 3"):
        prune_width(model, hidden_size=88)
