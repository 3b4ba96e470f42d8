"""distill=medusa: the preset composes (TVD, the drafter preset's teacher data), `stage=distill distill=medusa`
trains heads on a tiny teacher's own samples into common/medusa.py's artifact (tokenizer files and lineage
beside it, the validation in its metrics, the perplexity gate skipped), the artifact round-trips through
load_heads tensor by tensor, and bad settings are one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import ShrinkError, config_section
from common.medusa import MedusaError, MedusaHeads, is_medusa_dir, load_heads
from shrink.__main__ import compose
from shrink.medusa_distill import MedusaSettings, save_medusa_artifact, split_samples
from train.losses import parse_loss_spec

TINY_BUDGET = ["logging=none", "distill.tokens=1024", "distill.batch_size=2", "distill.warmup_steps=1",
               "distill.val_batches=1", "distill.chunk_size=64", "data=pydoc", "data.max_docs=30",
               "data.block_size=32", "data.teacher_generated.num_samples=12", "data.teacher_generated.max_tokens=24",
               "data.teacher_generated.prefix_tokens=8", "distill.medusa.val_fraction=0.25",
               "distill.medusa.num_heads=3"]


def test_preset_composes_tvd_heads_on_the_drafter_presets_teacher_data(tmp_path):
    cfg = compose(["stage=distill", "distill=medusa", f"run={tmp_path}"])
    drafter = compose(["stage=distill", "distill=drafter", f"run={tmp_path}"])
    assert [(k, w) for k, w, _ in parse_loss_spec(cfg.distill.losses, 1.0)] == [("tvd", 1.0)]
    assert float(cfg.distill.losses.tvd.temperature) == 1.0
    assert dict(cfg.distill.medusa) == {"num_heads": 4, "num_layers": 1, "val_fraction": 0.05}
    assert cfg.data == drafter.data and cfg.data.teacher_generated.ratio == 1.0
    assert cfg.distill.tokens > 0 and cfg.distill.token_frequencies is False
    assert "medusa" not in compose(["stage=distill", f"run={tmp_path}"]).distill  # the default distill is untouched
    small = compose(["stage=distill", "distill=medusa", f"run={tmp_path}", "distill.medusa.num_heads=2"])
    assert small.distill.medusa.num_heads == 2


@pytest.fixture(scope="module")
def medusa_run(tiny_teacher, tmp_path_factory):
    """One real `stage=distill distill=medusa` run on the tiny teacher (the command's main() in this
    process), shared by the tests that only read what it wrote (the artifact, its metrics, the engine
    loading it): (its exit status and output, run dir)."""
    from support import run_main

    tmp = tmp_path_factory.mktemp("medusa_run")
    run = tmp / "run"
    result = run_main("stage=distill", "distill=medusa", f"input={tiny_teacher}", f"run={run}",
                      f"cache_dir={tmp / 'cache'}", *TINY_BUDGET)
    return result, run


def test_tiny_heads_train_on_teacher_samples_into_a_medusa_artifact(tiny_teacher, medusa_run):
    result, run = medusa_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    art = run / "distill"
    assert is_medusa_dir(art)
    teacher_config = json.loads((tiny_teacher / "config.json").read_text())
    heads = load_heads(art, teacher_config["hidden_size"], teacher_config["vocab_size"])
    assert (heads.num_heads, heads.num_layers) == (3, 1)
    assert any(p.abs().sum() > 0 for p in heads.parameters())  # trained away from the zero start
    from shrink.modeling import load_tokenizer

    assert (art / "tokenizer.json").read_bytes() == (tiny_teacher / "tokenizer.json").read_bytes()
    assert load_tokenizer(art).get_vocab() == load_tokenizer(tiny_teacher).get_vocab()
    meta = json.loads((art / "shrink.json").read_text())
    assert meta["stage"] == "distill" and meta["content_hash"]
    (teacher_ref,) = meta["inputs"]
    assert teacher_ref["content_hash"] == json.loads((tiny_teacher / "shrink.json").read_text())["content_hash"]
    assert meta["config"]["distill"]["medusa"]["num_heads"] == 3 and "student" not in meta["config"]
    m = meta["metrics"]
    assert (Path(m["teacher_data"]) / "lineage.json").is_file() and m["teacher_data_samples"] == 12
    assert m["val_source"] == "3 held-out teacher samples" and "teacher-generated" in m["data_source"]
    assert m["train_tokens"] == 1024 and m["steps"] == 16 and m["num_heads"] == 3
    for key in ("head_agreement", "init_head_agreement"):
        assert len(m[key]) == 3 and all(0.0 <= a <= 1.0 for a in m[key])
    for key in ("mean_accepted_length", "init_mean_accepted_length"):
        assert list(m[key]) == ["1", "2", "3"]
        assert all(1.0 <= v <= int(k) + 1 for k, v in m[key].items())
    assert {"val_loss", "val_tvd", "val_head0_tvd", "val_head2_tvd", "init_val_loss"} <= set(m)
    assert m["quality_gate"]["skipped"].startswith("Medusa heads") and m["quality_gate"]["reverted"] is False
    assert "quality gate: distill skipped" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_artifact_round_trips_every_tensor(tiny_teacher, tmp_path, dtype):
    from shrink.artifacts import Artifact
    from shrink.modeling import load_tokenizer

    heads = MedusaHeads(64, 320, 3, 2)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape))
    teacher = Artifact.load(tiny_teacher)
    art = save_medusa_artifact(tmp_path / "heads", heads, load_tokenizer(teacher), dtype=dtype, inputs=[teacher],
                               metrics={"head_agreement": [0.5, 0.25, 0.125]})
    loaded = load_heads(art.path, 64, 320)
    want, got = heads.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and len(got) == 3 * 2 * 2
    for name, value in want.items():
        assert torch.equal(got[name], value.to(dtype).float()), name
    assert next(heads.parameters()).dtype == torch.float32  # the caller's heads are not cast
    assert art.meta["inputs"][0]["content_hash"] == teacher.content_hash
    assert load_tokenizer(art.path).get_vocab() == load_tokenizer(teacher).get_vocab()
    with pytest.raises(MedusaError, match="hidden_size 64 does not match the target's 576"):
        load_heads(art.path, 576, 320)


@pytest.mark.parametrize("raw, message", [
    ({"num_heads": 0}, "distill.medusa.num_heads must be >= 1, got 0"),
    ({"num_layers": 1.5}, "distill.medusa.num_layers: expected an integer, got 1.5"),
    ({"num_heads": True}, "distill.medusa.num_heads: expected an integer, got True"),
    ({"val_fraction": 1.0}, r"distill.medusa.val_fraction must be in \(0, 1\), got 1.0"),
    ({"heads": 4}, r"distill.medusa: unknown keys \['heads'\]"),
    (4, "distill.medusa: expected a mapping"),
])
def test_bad_settings_name_the_key(raw, message):
    with pytest.raises(ShrinkError, match=message), config_section("distill"):
        MedusaSettings.from_cfg(raw)


def test_held_out_samples_are_drawn_over_the_whole_list_and_too_few_is_named():
    samples = [[i] for i in range(100)]  # continuations first, instruction answers last
    held, kept = split_samples(samples, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90 and sorted(held + kept) == samples
    assert held == sorted(held) and kept == sorted(kept)  # each part in its order
    assert min(held)[0] < 50 <= max(held)[0]  # from both halves
    assert split_samples(samples, 0.1, seed=3) == (held, kept) != split_samples(samples, 0.1, seed=4)
    assert len(split_samples([[1]] * 10, 0.05)[0]) == 1  # at least one
    with pytest.raises(ShrinkError, match="holds out 2 of 2 teacher samples"), config_section("distill"):
        split_samples([[1], [2]], 0.9)


@pytest.mark.parametrize("override, message", [
    ("distill.medusa.num_heads=0", "distill.medusa.num_heads must be >= 1, got 0"),
    ("data.block_size=5", "distill.medusa.num_heads=4 needs data.block_size >= num_heads + 2 = 6"),
    ("distill.lmbda=0.5", "distill.lmbda does not apply to Medusa heads"),
])
def test_bad_settings_through_the_cli_are_one_line(tiny_teacher, tmp_path, override, message):
    from support import run_cli

    result = run_cli("stage=distill", "distill=medusa", f"input={tiny_teacher}", f"run={tmp_path / 'run'}",
                     "logging=none", override)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_the_stages_heads_draft_in_the_engine_and_greedy_output_is_the_teachers(tiny_teacher, medusa_run):
    """The contract end to end: what `stage=distill distill=medusa` writes is what the engine's
    `method: medusa` loads (sizes, tokenizer, tensors), it drafts, and greedy output is unchanged."""
    from engine import LLM, SamplingParams

    result, run = medusa_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    prompts = [{"prompt_token_ids": [5 + i, 17, 3 * i + 2, 40, 9][: 3 + i]} for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = [o.token_ids for o in LLM(str(tiny_teacher), device="cpu").generate(prompts, params)]
    llm = LLM(str(tiny_teacher), device="cpu",
              speculative_config={"method": "medusa", "model": str(run / "distill"), "num_speculative_tokens": 3})
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain
    assert llm.engine.num_spec_steps > 0 and llm.engine.spec_metrics.num_proposed > 0


def test_heads_in_a_pipeline_before_model_stages_are_refused_before_any_work(tmp_path):
    with pytest.raises(ShrinkError, match=r"distill=medusa trains Medusa heads .* \(gqa, prune, quantize\) can take"):
        compose(["stage=pipeline", "distill=medusa", f"run={tmp_path}"])  # compose checks the config
    compose(["stage=pipeline", "distill=medusa", f"run={tmp_path}", "stage.stages=[import,distill,eval]"])  # eval skips heads
    compose(["stage=distill", "distill=medusa", f"run={tmp_path}"])


def test_eval_leaves_heads_out_of_the_run_it_evaluates(tiny_teacher, tmp_path):
    import shutil

    from shrink.stages.evaluate import run_artifacts

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run / "teacher")
    heads = run / "distill"
    heads.mkdir()
    from common.medusa import save_heads

    save_heads(MedusaHeads(8, 16, 2), heads)
    meta = json.loads((run / "teacher" / "shrink.json").read_text())
    (heads / "shrink.json").write_text(json.dumps({**meta, "stage": "distill", "inputs": []}))
    assert [a.path.name for a in run_artifacts(run)] == ["teacher"]
