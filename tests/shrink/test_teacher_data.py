"""Teacher-generated data: sampled by our engine from the teacher, cached by lineage and reused."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from common.errors import ShrinkError
from shrink.artifacts import Artifact
from shrink.teacher_data import (DATA_FILE, LINEAGE_FILE, TeacherDataSettings, build_prompts, engine_generate,
                                 load_entry, teacher_samples)


def settings(**overrides) -> TeacherDataSettings:
    values = dict(ratio=0.5, num_samples=6, max_tokens=8, prefix_tokens=5, instructions=None,
                  instruction_field="text", instruction_fraction=0.0, seed=0)
    return TeacherDataSettings(**{**values, **overrides})


def counting_engine():
    calls: list[int] = []

    def generate(teacher, prompts, s, device):
        calls.append(len(prompts))
        return engine_generate(teacher, prompts, s, device)

    return generate, calls


def test_engine_samples_are_cached_with_lineage_and_reused(tiny_teacher, tmp_path):
    teacher = Artifact.load(tiny_teacher)
    blocks = torch.randint(3, 300, (10, 16), generator=torch.Generator().manual_seed(0))
    s = settings()
    prompts = build_prompts(blocks, [], None, s)
    assert len(prompts) == 6 and all(len(p) == 5 for p in prompts)
    assert all(any(p == b[:5].tolist() for b in blocks) for p in prompts)  # prefixes of training blocks
    generate, calls = counting_engine()
    first, entry = teacher_samples(teacher, prompts, s, tmp_path, generate=generate)
    assert calls == [6]
    assert all(x[:5] == p and 5 < len(x) <= 13 for x, p in zip(first, prompts))
    record = json.loads((entry / LINEAGE_FILE).read_text())
    assert record["teacher_content_hash"] == teacher.content_hash
    assert record["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    assert record["seed"] == 0 and record["count"] == 6

    def must_not_generate(*args):
        raise AssertionError("a cached lineage was generated again")

    again, entry2 = teacher_samples(teacher, prompts, s, tmp_path, generate=must_not_generate)
    assert again == first and entry2 == entry

    reseeded, entry3 = teacher_samples(teacher, prompts, settings(seed=1), tmp_path, generate=generate)
    assert calls == [6, 6] and entry3 != entry
    assert json.loads((entry3 / LINEAGE_FILE).read_text())["seed"] == 1
    assert reseeded != first  # temperature-1 samples under another seed differ


def test_an_entry_drawn_by_other_seeded_draws_is_not_reused(tiny_teacher, tmp_path, monkeypatch):
    """The lineage names how seeded requests draw: an entry an engine with other seeded draws wrote (the old
    per-request torch.Generator) gets another key, so the samples are made again, not passed off as this seed's."""
    import shrink.teacher_data as td

    teacher = Artifact.load(tiny_teacher)
    blocks = torch.randint(3, 300, (10, 16), generator=torch.Generator().manual_seed(0))
    prompts = build_prompts(blocks, [], None, settings())
    generate, calls = counting_engine()
    monkeypatch.setattr(td, "SEEDED_DRAWS", "torch.Generator per request")
    _, old = teacher_samples(teacher, prompts, settings(), tmp_path, generate=generate)
    monkeypatch.undo()
    _, new = teacher_samples(teacher, prompts, settings(), tmp_path, generate=generate)
    assert calls == [6, 6] and new != old
    assert json.loads((new / LINEAGE_FILE).read_text())["seeded_draws"] == td.SEEDED_DRAWS


def test_instruction_prompts_use_the_chat_template(tiny_teacher):
    from shrink.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_teacher)
    tokenizer.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}<s>assistant:"
    s = settings(num_samples=4, instruction_fraction=0.5, instructions="prompts.txt")
    blocks = torch.randint(3, 300, (4, 16))
    prompts = build_prompts(blocks, ["what is a fox"], tokenizer, s)
    expected = tokenizer("<s>user: what is a fox</s><s>assistant:", add_special_tokens=False)["input_ids"]
    assert prompts[2:] == [expected, expected] and all(len(p) == 5 for p in prompts[:2])


def test_bad_settings_name_the_key():
    with pytest.raises(ShrinkError, match="data.teacher_generated.ratio"):
        TeacherDataSettings.from_cfg({"ratio": 1.5, "num_samples": 4}, seed=0)
    with pytest.raises(ShrinkError, match="data.teacher_generated: unknown keys \\['samples'\\]"):
        TeacherDataSettings.from_cfg({"ratio": 0.5, "samples": 4}, seed=0)
    with pytest.raises(ShrinkError, match="instructions"):
        TeacherDataSettings.from_cfg({"ratio": 0.5, "num_samples": 4, "instruction_fraction": 0.5}, seed=0)


def test_distill_stage_trains_on_the_mix_and_reuses_the_cache(tiny_teacher, tmp_path):
    from support import run_main

    common = ["stage=distill", f"input={tiny_teacher}", "logging=none", "data=pydoc", "data.max_docs=30",
              "data.block_size=64", "distill.batch_size=2", "distill.checkpoint_every=0", "distill.max_steps=2",
              "distill.val_batches=1", f"cache_dir={tmp_path / 'cache'}", "data.teacher_generated.ratio=0.5",
              "data.teacher_generated.num_samples=8", "data.teacher_generated.max_tokens=24",
              "data.teacher_generated.prefix_tokens=8", "gates.context=32", "gates.windows=2"]
    first = run_main(*common, f"run={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher data: generating 8 samples" in first.stdout
    m = json.loads((tmp_path / "a" / "distill" / "shrink.json").read_text())["metrics"]
    assert m["teacher_data_samples"] == 8 and m["teacher_data_ratio"] == 0.5
    assert "teacher-generated (50% of blocks)" in m["data_source"]
    assert m["quality_gate"]["budget"] == 2.0
    second = run_main(*common, f"run={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher data: 8 samples reused" in second.stdout and "generating" not in second.stdout


def test_temperature_zero_is_the_teachers_greedy_continuation_and_negative_is_named(tiny_teacher):
    """temperature 0: the teacher's argmax continuations (what a greedy speculative decode verifies), the
    same under any seed; a negative temperature is refused naming the key."""
    from engine import LLM, SamplingParams

    prompts = [[5, 9, 17, 3, 40], [7, 7, 21]]
    teacher = Artifact.load(tiny_teacher)
    first = engine_generate(teacher, prompts, settings(temperature=0.0, max_tokens=6), "cpu")
    assert first == engine_generate(teacher, prompts, settings(temperature=0.0, max_tokens=6, seed=3), "cpu")
    argmax = LLM(str(tiny_teacher), device="cpu").generate([{"prompt_token_ids": p} for p in prompts],
                                                          SamplingParams(temperature=0.0, max_tokens=6))
    assert first == [list(o.token_ids) for o in argmax] and all(len(x) > 0 for x in first)
    with pytest.raises(ShrinkError, match=r"data.teacher_generated: temperature must be >= 0 \(0: greedy\)"):
        settings(temperature=-0.5).check()


def test_the_engine_is_sized_by_the_job_and_a_smaller_batch_gives_the_same_samples(tiny_teacher, monkeypatch):
    """engine_generate holds at most GENERATE_SEQS sequences a step in a KV pool sized for them (not by
    free memory); with one sequence a step the greedy samples are the ones a batch of three gives."""
    import engine
    import shrink.teacher_data as td

    teacher = Artifact.load(tiny_teacher)
    prompts = [[5, 9, 17, 3, 40], [7, 7, 21], [11, 2]]
    s = settings(temperature=0.0, max_tokens=5)
    seen = []
    real_llm = engine.LLM

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_llm(*args, **kwargs)

    monkeypatch.setattr(engine, "LLM", spy)
    batched = engine_generate(teacher, prompts, s, "cpu")
    monkeypatch.setattr(td, "GENERATE_SEQS", 1)
    one_at_a_time = engine_generate(teacher, prompts, s, "cpu")
    assert batched == one_at_a_time and all(len(x) == 5 for x in batched)
    max_len = 5 + 5
    assert [(k["max_num_seqs"], k["kv_cache_tokens"]) for k in seen] == [(3, 3 * max_len), (1, max_len)]


def _fake_generate(token: int):
    def generate(teacher, prompts, s, device):
        return [[token] * s.max_tokens for _ in prompts]
    return generate


def test_an_entry_another_process_wrote_meanwhile_is_kept(tiny_teacher, tmp_path):
    """Two training chains on one cache generate the same lineage at once: the one that finishes second
    keeps the first one's entry (neither deleted nor overwritten) and returns its own samples."""
    teacher = Artifact.load(tiny_teacher)
    s = settings()
    prompts = [[5, 6, 7, 8, 9]] * 3

    def racing(t, p, st, device):  # the other process finishes while this one generates
        teacher_samples(t, p, st, tmp_path, generate=_fake_generate(11))
        return _fake_generate(12)(t, p, st, device)

    mine, entry = teacher_samples(teacher, prompts, s, tmp_path, generate=racing)
    assert all(x[5:] == [12] * 8 for x in mine)
    kept = torch.load(entry / "samples.pt", weights_only=True)["samples"]
    assert all(x[5:] == [11] * 8 for x in kept)  # the other process's entry
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left


def test_a_rename_that_loses_the_race_keeps_the_winners_entry(tiny_teacher, tmp_path, monkeypatch):
    """The other process's entry lands between this one's removal of a damaged entry and its rename:
    the rename fails (the folder is not empty) and the winner's complete entry is used, not an error."""
    import shrink.teacher_data as td

    teacher = Artifact.load(tiny_teacher)
    s = settings()
    prompts = [[5, 6, 7, 8, 9]] * 3
    _, entry = teacher_samples(teacher, prompts, s, tmp_path, generate=_fake_generate(11))
    (entry / "samples.pt").write_bytes(b"damaged")  # unreadable: this call regenerates
    winner = tmp_path / "winner"
    shutil.copytree(entry, winner)
    torch.save({"samples": [p + [13] * 8 for p in prompts]}, winner / "samples.pt")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == entry and not entry.exists():
            real_replace(winner, entry)  # the other process renames first
        return real_replace(src, dst)

    monkeypatch.setattr(td.os, "replace", replace)
    mine, got = teacher_samples(teacher, prompts, s, tmp_path, generate=_fake_generate(12))
    assert got == entry and all(x[5:] == [12] * 8 for x in mine)
    assert all(x[5:] == [13] * 8 for x in torch.load(entry / "samples.pt", weights_only=True)["samples"])
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_load_entry_returns_the_samples_and_refuses_a_wrong_count_or_token(tiny_teacher, tmp_path):
    """An entry reused by another experiment (experiments/gqa.py --teacher-samples) is verified: the samples
    and lineage that teacher_samples wrote come back; a count other than the lineage's, an empty sample or an
    id beyond the vocabulary is named."""
    teacher = Artifact.load(tiny_teacher)
    prompts = [[5, 6, 7, 8, 9]] * 3
    written, entry = teacher_samples(teacher, prompts, settings(), tmp_path, generate=_fake_generate(11))
    samples, record = load_entry(entry, teacher, vocab_size=12)
    assert samples == written and record == json.loads((entry / LINEAGE_FILE).read_text())
    with pytest.raises(ShrinkError, match=r"sample 0 is not a non-empty list of token ids in \[0, 11\)"):
        load_entry(entry, teacher, vocab_size=11)
    for bad, match in (([[5]] * 2, "holds 2 samples, lineage.json counts 3"), ([[5], [], [5]], "sample 1")):
        torch.save({"samples": bad}, entry / DATA_FILE)
        with pytest.raises(ShrinkError, match=match):
            load_entry(entry, teacher)
    (entry / LINEAGE_FILE).unlink()
    with pytest.raises(ShrinkError, match=f"{re.escape(str(entry))}: lineage.json is missing"):
        load_entry(entry, teacher)
