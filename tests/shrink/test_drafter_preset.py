"""distill=drafter (and its CE baseline distill=drafter_ce): the presets compose to the same student,
data and budget with different losses; a drafter trained by `stage=distill distill=drafter` on the
teacher's own samples loads as the teacher's speculative model and greedy output is unchanged by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shrink.__main__ import compose
from train.losses import parse_loss_spec

TINY_BUDGET = ["logging=none", "distill.tokens=256", "distill.batch_size=2", "distill.warmup_steps=1",
               "distill.checkpoint_every=0", "distill.val_batches=1", "distill.chunk_size=64", "data=pydoc",
               "data.max_docs=30", "data.block_size=64", "data.teacher_generated.num_samples=8",
               "data.teacher_generated.max_tokens=24", "data.teacher_generated.prefix_tokens=8",
               "gates.context=32", "gates.windows=1"]


def _losses(cfg) -> list[tuple[str, float]]:
    return [(key, weight) for key, weight, _ in parse_loss_spec(cfg.distill.losses, float(cfg.distill.temperature))]


def test_drafter_and_its_ce_baseline_differ_only_in_the_loss(tmp_path):
    kd = compose(["stage=distill", "distill=drafter", f"run={tmp_path}"])
    ce = compose(["stage=distill", "distill=drafter_ce", f"run={tmp_path}"])
    assert _losses(kd) == [("tvd", 1.0)] and _losses(ce) == [("ce", 1.0)]
    assert kd.student.keep_layers == "first:4" and kd.student.init == "teacher_layers"
    assert kd.data.teacher_generated.ratio == 1.0 and kd.data.teacher_generated.temperature == 1.0
    for group in ("student", "data"):
        assert kd[group] == ce[group]
    strip = lambda c: {k: v for k, v in c.distill.items() if k != "losses"}  # noqa: E731
    assert strip(kd) == strip(ce) and kd.distill.tokens > 0
    # Overrides still win over the preset.
    small = compose(["stage=distill", "distill=drafter", f"run={tmp_path}", "student.keep_layers=first:2"])
    assert small.student.keep_layers == "first:2"


def train_drafter(teacher: Path, run: Path, preset: str, keep: str, *extra: str) -> Path:
    from support import run_main

    result = run_main("stage=distill", f"distill={preset}", f"input={teacher}", f"run={run}",
                      f"student.keep_layers={keep}", f"cache_dir={run.parent / 'cache'}", *TINY_BUDGET, *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run / "distill"


def greedy(target: Path, prompts: list[str], max_tokens: int, **kwargs) -> tuple[list[list[int]], object]:
    from engine import LLM, SamplingParams

    llm = LLM(str(target), device="cpu", max_model_len=128, **kwargs)  # (the CPU attention spans all of it)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [list(o.token_ids) for o in out], llm.engine.spec_metrics


def check_drafter(teacher: Path, drafter: Path, n_teacher_layers: int, keep: list[int]) -> dict:
    info = json.loads((drafter / "shrink.json").read_text())
    m = info["metrics"]
    assert m["kept_layers"] == keep
    assert json.loads((drafter / "config.json").read_text())["num_hidden_layers"] == len(keep) < n_teacher_layers
    assert "teacher-generated (100% of blocks)" in m["data_source"] and m["teacher_data_samples"] == 8
    assert "val_tvd" in m and m["train_tokens"] >= 256
    return m


def test_tiny_drafter_trains_on_teacher_samples_and_drafts_losslessly(tiny_teacher, tmp_path):
    drafter = train_drafter(tiny_teacher, tmp_path / "run", "drafter", "first:2")
    check_drafter(tiny_teacher, drafter, 4, [0, 1])
    prompts = ["The river runs past", "def f(x):", "Once upon a time there"]
    plain, _ = greedy(tiny_teacher, prompts, 20)
    spec, metrics = greedy(tiny_teacher, prompts, 20,
                           speculative_config={"model": str(drafter), "num_speculative_tokens": 3})
    assert spec == plain
    assert metrics.num_proposed > 0
    # The artifact holds its training text's token counts: a drafter over a subset of the vocabulary.
    from engine.spec_decode.draft_vocab import FREQUENCY_FILE

    lines = (drafter / FREQUENCY_FILE).read_text().splitlines()
    counts = [int(line.split("\t")[1]) for line in lines]
    assert len(lines) == json.loads((drafter / "shrink.json").read_text())["metrics"]["token_frequencies"] > 8
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0
    subset, subset_metrics = greedy(tiny_teacher, prompts, 20, speculative_config={
        "model": str(drafter), "num_speculative_tokens": 3, "draft_vocab_size": 64})
    assert subset == plain and subset_metrics.num_proposed > 0


def test_token_frequencies_must_be_a_bool_and_need_lm_text(tmp_path):
    from support import run_cli

    bad = run_cli("stage=distill", f"run={tmp_path / 'run'}", "distill.token_frequencies=maybe")
    assert bad.returncode != 0 and "distill.token_frequencies: must be true or false" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_real_teacher_drafter_is_lossless_and_often_accepted(smollm2_artifact, tmp_path):
    drafter = train_drafter(smollm2_artifact, tmp_path / "run", "drafter", "first:4")
    check_drafter(smollm2_artifact, drafter, 30, [0, 1, 2, 3])
    prompts = ["The capital of France is", "In 1990, the population of the city"]
    plain, _ = greedy(smollm2_artifact, prompts, 24)
    spec, metrics = greedy(smollm2_artifact, prompts, 24,
                           speculative_config={"model": str(drafter), "num_speculative_tokens": 4})
    assert spec == plain
    # A 4-layer drafter after a few steps disagrees often but not always: the check is not vacuous.
    assert 0.0 < metrics.acceptance_rate < 1.0, metrics.as_dict()
